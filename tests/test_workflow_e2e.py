"""End to end: `pyflyte run workflows/finetune.py finetune` on the demo assets, for real.

Real bitsandbytes QLoRA on the CPU, a real MLflow server on 127.0.0.1, vLLM's CPU build serving the
merged model. Run twice: the second execution must come from Flyte's cache and register nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SERVE_PYTHON = Path(os.environ.get("QLORAFLOW_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(not SERVE_PYTHON.exists(), reason=f"no serving environment at {SERVE_PYTHON}")]


def _pyflyte(config: Path, env: dict) -> tuple[str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("pyflyte")), "run", "workflows/finetune.py",
                           "finetune", "--config", str(config)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out, time.monotonic() - t0


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, mlflow_server):
    from qloraflow.demo import generate_demo_assets

    root = tmp_path_factory.mktemp("e2e")
    generate_demo_assets(root / "demo", seed=0, n_train=1200, n_test=40)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"].update(train_files=[str(root / "demo/data/train.jsonl")], test_files=[str(root / "demo/data/test.jsonl")])
    cfg["model"]["base_model"] = str(root / "demo/base-model")
    cfg["eval"].update(sqlite_db=str(root / "demo/data/shop.sqlite"), max_samples=40)
    cfg["output_dir"] = str(root / "outputs")
    cfg["serve"]["python"] = str(SERVE_PYTHON)
    cfg["registry"]["model_name"] = "e2e-tiny-sql"
    cfg["tracking"]["experiment"] = "e2e"
    config = root / "e2e.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # Flyte's local cache lives under $HOME and task outputs under $TMPDIR: keep both inside the test.
    (root / "home").mkdir()
    (root / "tmp").mkdir()
    env = dict(os.environ, HOME=str(root / "home"), TMPDIR=str(root / "tmp"), MLFLOW_TRACKING_URI=mlflow_server,
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    summary_file = root / "outputs" / cfg["name"] / "summary.json"
    first, t_first = _pyflyte(config, env)
    summary = json.loads(summary_file.read_text())
    second, t_second = _pyflyte(config, env)
    return {"first": first, "second": second, "t_first": t_first, "t_second": t_second, "summary": summary,
            "second_summary": json.loads(summary_file.read_text()), "cfg": cfg, "uri": mlflow_server}


def test_pipeline_fine_tunes_serves_and_registers(pipeline_runs):
    s = pipeline_runs["summary"]
    data = s["data"]
    assert data["read"] == data["kept"] + data["rejected"]
    assert data["rejected_by_reason"].get("exact_duplicate", 0) >= 1
    assert data["rejected_by_reason"].get("near_duplicate", 0) >= 1
    assert data["rejected_by_reason"].get("invalid_json", 0) >= 1
    assert s["train"]["train_loss_last"] < s["train"]["train_loss_first"]
    base, cand = s["eval"]["base"], s["eval"]["candidate"]
    assert cand["execution_accuracy"] > base["execution_accuracy"]
    assert cand["heldout_loss"] < base["heldout_loss"]
    assert s["deploy"]["passed"] is True
    assert s["deploy"]["hf_agreement"] >= 0.95  # vLLM greedy == HF generate greedy on the held-out prompts
    assert s["deploy"]["vllm_exact_match"] >= 0.5  # the served model answers held-out SQL questions correctly
    # after the deploy stage the server is gone: no process of its group, its port free
    from qloraflow.serve import port_is_free

    assert "pid" not in s["deploy"]  # a stopped server's pid is no use to a user
    assert port_is_free("127.0.0.1", s["deploy"]["port"])
    assert s["registry"]["version"] == "1" and s["registry"]["promoted"] is True
    manifests = Path(pipeline_runs["cfg"]["output_dir"]) / pipeline_runs["cfg"]["name"] / s["registry"]["manifests"]  # the new champion's serving manifests, per target
    assert (manifests / "k8s" / "current").read_text().strip() == "1"
    assert any((manifests / "kserve" / "1").glob("*.yaml"))
    assert "qloraflow pipeline summary" in pipeline_runs["first"]


def test_second_run_is_served_from_cache_and_registers_nothing(pipeline_runs):
    from qloraflow import registry

    second = pipeline_runs["second"]
    assert pipeline_runs["t_second"] < 0.5 * pipeline_runs["t_first"], (pipeline_runs["t_first"], pipeline_runs["t_second"])
    assert "unchanged: already registered" in second
    stages = pipeline_runs["second_summary"]["stages"]
    switched_off = {"export"}  # export.gguf is empty in this config: skipped, never cached
    assert all(v.startswith("cached") for k, v in stages.items() if k not in switched_off), stages  # the summary says so
    assert all(stages[k] == "skipped" for k in switched_off), stages
    client = registry.client_for(pipeline_runs["uri"])
    assert len(registry.list_versions(client, "e2e-tiny-sql")) == 1


def test_compare_reads_both_pipeline_runs_and_writes_a_png(pipeline_runs, tmp_path):
    from qloraflow.compare import compare_main

    png = tmp_path / "compare.png"
    assert compare_main(["--experiment", "e2e", "--tracking-uri", pipeline_runs["uri"], "--metrics",
                         "candidate.execution_accuracy", "base.execution_accuracy", "--sort",
                         "candidate.execution_accuracy", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from mlflow.tracking import MlflowClient

    from qloraflow.compare import comparison_table, pipeline_runs as runs_of

    runs = runs_of(MlflowClient(pipeline_runs["uri"]), "e2e")
    assert len(runs) == 2  # one MLflow run per pipeline execution, findable by its Flyte execution id
    rows = comparison_table(runs, ["train.learning_rate"], ["candidate.execution_accuracy"], None)
    assert all(r["execution"] for r in rows)
