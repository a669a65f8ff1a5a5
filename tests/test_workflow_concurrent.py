"""Two executions at once: one MLflow server, one output folder, one registered model, two configs.

Both `pyflyte run`s start together (learning rate 2e-3 for 12 steps, 3e-3 for 24: the shorter one
usually registers first and the longer one then takes the alias from it; vLLM serving on; gate on
chrf, which a few CPU training steps already lift above the base). Checked: both finish; each keeps its
own summary, merged model and registered version, intact (what MLflow holds hashes to what the
merge wrote); exactly one champion, the better version, and the serving manifests point at it.
Then `qloraflow compare` reads the two executions back into a table and a PNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, finished_pyflyte, pyflyte_env, quick_pipeline_config, snapshot_project, start_pyflyte

SERVE_PYTHON = Path(os.environ.get("QLORAFLOW_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(not SERVE_PYTHON.exists(), reason=f"no serving environment at {SERVE_PYTHON}")]

# learning rate (as MLflow logs it) -> training steps
RUNS = {"0.002": 12, "0.003": 24}
MODEL = "concurrent-sql"
EXPERIMENT = "concurrent"


@pytest.fixture(scope="module")
def two_executions(tmp_path_factory, mlflow_server, small_demo):
    root = tmp_path_factory.mktemp("concurrent")
    project = snapshot_project(root / "project")
    env = pyflyte_env(root, mlflow_server)  # one Flyte cache and one TMPDIR too: one machine, one user
    started = []
    for lr, steps in RUNS.items():
        cfg = quick_pipeline_config(small_demo, root / "outputs", **{
            "registry.model_name": MODEL, "tracking.experiment": EXPERIMENT, "merge.metric_tolerance": 0.2})
        cfg["train"].update(max_steps=steps, save_steps=steps, eval_steps=steps, logging_steps=2,
                            learning_rate=float(lr))
        cfg["eval"].update(metrics=["exact_match", "execution_accuracy", "chrf"], gate_metric="chrf")
        cfg["serve"].update(enabled=True, python=str(SERVE_PYTHON))
        config = root / f"lr-{lr}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        log = root / f"lr-{lr}.log"
        started.append((start_pyflyte(project, config, env, log), log))
    summaries = {lr: finished_pyflyte(proc, log)[1] for lr, (proc, log) in zip(RUNS, started)}
    return {"summaries": summaries, "outputs": root / "outputs" / cfg["name"], "uri": mlflow_server}


def test_each_execution_keeps_its_own_summary_and_model(two_executions):
    from qloraflow.merge import model_digest

    summaries, outputs = two_executions["summaries"], two_executions["outputs"]
    run_ids = {s["mlflow_run_id"] for s in summaries.values()}
    assert len(run_ids) == 2
    for s in summaries.values():
        own = outputs / "runs" / s["mlflow_run_id"] / "summary.json"
        assert outputs / s["summary_file"] == own and json.loads(own.read_text())["mlflow_run_id"] == s["mlflow_run_id"]
        assert s["deploy"]["passed"] is True  # each served its own merged model
    assert json.loads((outputs / "summary.json").read_text()) in list(summaries.values())  # the latest, whole
    assert sorted(p.parent.name for p in (outputs / "runs").glob("*/summary.json")) == sorted(run_ids)
    merged = [outputs / s["merged_dir"] for s in summaries.values()]
    assert merged[0] != merged[1] and model_digest(merged[0]) != model_digest(merged[1])


def test_both_versions_registered_intact_and_the_better_one_is_champion(two_executions, tmp_path):
    from qloraflow import registry
    from qloraflow.merge import model_digest
    from qloraflow.mlflow_model import download_version

    summaries, uri = two_executions["summaries"], two_executions["uri"]
    client = registry.client_for(uri)
    versions = {mv.run_id: mv for mv in client.search_model_versions(f"name='{MODEL}'")}
    assert set(versions) == {s["mlflow_run_id"] for s in summaries.values()}  # one version per execution
    for s in summaries.values():
        mv = versions[s["mlflow_run_id"]]
        assert s["registry"]["version"] == str(mv.version)
        local = download_version(client, mv.source, tmp_path / str(mv.version))  # the checkpoint, MLflow Model or not
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in local.iterdir()}
        # the bytes the registry serves are the bytes this execution's merge wrote
        assert model_digest(local) == mv.tags["model.sha256"] == model_digest(two_executions["outputs"] / s["merged_dir"])
        assert float(mv.tags["metric.chrf"]) == pytest.approx(s["eval"]["merged"]["chrf"])
        assert s["eval"]["merged"]["chrf"] > s["eval"]["base"]["chrf"]  # both were eligible
    best = max(versions.values(), key=lambda mv: float(mv.tags["metric.chrf"]))
    assert client.get_registered_model(MODEL).aliases == {"champion": str(best.version)}
    winner = next(s for s in summaries.values() if s["mlflow_run_id"] == best.run_id)
    assert winner["registry"]["promoted"] is True
    for target in ("k8s", "kserve"):  # the serving manifests follow the alias, not the last writer
        folder = two_executions["outputs"] / "deploy" / target
        assert (folder / "current").read_text().strip() == str(best.version)
        assert any((folder / str(best.version)).glob("*.yaml"))


def test_compare_tables_and_plots_both_executions(two_executions, tmp_path, capsys):
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    from qloraflow.compare import compare_main, pipeline_runs, stage_run

    png = tmp_path / "compare.png"
    assert compare_main(["--experiment", EXPERIMENT, "--tracking-uri", two_executions["uri"], "--params",
                         "train.learning_rate", "--metrics", "candidate.chrf", "base.chrf", "--sort",
                         "candidate.chrf", "--out", str(png)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]  # header, rule, one row per execution
    by_lr = {s["eval"]["candidate"]["chrf"]: lr for lr, s in two_executions["summaries"].items()}
    assert [row.split()[2] for row in rows] == [by_lr[c] for c in sorted(by_lr, reverse=True)]  # sorted, best first
    for row, chrf in zip(rows, sorted(by_lr, reverse=True)):
        assert float(row.split()[3]) == pytest.approx(chrf, abs=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    client = MlflowClient(two_executions["uri"])
    for run in pipeline_runs(client, EXPERIMENT):  # the loss curves plotted come from each execution's training
        assert len(client.get_metric_history(stage_run(client, run, "train").info.run_id, "loss")) >= 3
