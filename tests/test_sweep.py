"""The sweep: its config section's checks, the trials it expands to, and `pyflyte run workflows/sweep.py`
for real (4 trials on the small demo, tracked as nested MLflow runs, compared, the winner gated; the
second execution trains nothing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, pyflyte_env, quick_pipeline_config, snapshot_project

from qloraflow.config import config_from_dict
from qloraflow.errors import ConfigError
from qloraflow.sweep import SweepError, pick_winner, trial_config, trial_overrides

BASE = {"data": {"train_files": ["t.jsonl"]}, "model": {"base_model": "m"}, "train": {"eval_steps": 5}}


def sweep_config(**sweep):
    return config_from_dict({**BASE, "sweep": sweep})


def test_grid_expands_every_combination_in_order_and_random_draws_a_seeded_subset():
    cfg = sweep_config(params={"train.learning_rate": [1.0e-4, 3.0e-4], "lora.r": [4, 8]})
    assert trial_overrides(cfg) == [{"train.learning_rate": 1e-4, "lora.r": 4}, {"train.learning_rate": 1e-4, "lora.r": 8},
                                    {"train.learning_rate": 3e-4, "lora.r": 4}, {"train.learning_rate": 3e-4, "lora.r": 8}]
    rand = sweep_config(method="random", num_trials=3, params={"train.learning_rate": [1.0e-4, 3.0e-4, 1.0e-3],
                                                               "lora.r": [4, 8, 16]})
    drawn = trial_overrides(rand)
    assert len(drawn) == 3 == len({json.dumps(d, sort_keys=True) for d in drawn}) and drawn == trial_overrides(rand)
    trial = trial_config(cfg, drawn[0])
    assert (trial.train.learning_rate, trial.lora.r) == (drawn[0]["train.learning_rate"], drawn[0]["lora.r"])
    assert not trial.sweep.params  # a trial is a plain pipeline config


def test_bad_sweep_sections_are_refused_with_every_problem_named():
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, "data": {"train_files": ["t.jsonl"], "validation_fraction": 0.0},
                          "sweep": {"method": "random", "num_trials": 9, "metric": "eval_loss",
                                    "params": {"train.learning_rate": [0, "1e-4"], "lora.rank": [4], "data.seed": [1],
                                               "train.distributed": ["ddp"], "lora.r": 8}}})
    text = str(err.value)
    for expected in ("'sweep.params.train.learning_rate': value 0 fails: 'train.learning_rate' must be > 0",
                     "'sweep.params.train.learning_rate': '1e-4' must be float", "write 1.0e-4",
                     "'sweep.params.lora.rank': 'lora' has no key 'rank'; its keys: r, alpha",
                     "'sweep.params.data.seed': only lora.* and train.* keys can be swept",
                     "'sweep.params.train.distributed': says how the work is spread",
                     "'sweep.params.lora.r' must be a non-empty list",
                     "'sweep.num_trials' must be between 1 and 2", "'sweep.metric' eval_loss is the validation loss"):
        assert expected in text, (expected, text)
    with pytest.raises(ConfigError, match="'sweep.metric' is 'heldout_exact_match'; choose one of: eval_loss"):
        sweep_config(metric="heldout_exact_match", params={"lora.r": [4, 8]})
    with pytest.raises(ConfigError, match="a grid trains every combination"):
        sweep_config(num_trials=3, params={"lora.r": [4, 8]})
    sweep_config(params={"lora.r": [4, 8]})  # the negative control: a good section passes


def test_the_winner_has_the_lowest_validation_loss_and_no_loss_is_an_error():
    assert pick_winner([0.9, 0.6, None, 0.6], "eval_loss") == 1  # a tie goes to the earlier trial
    with pytest.raises(SweepError, match="train.eval_steps"):
        pick_winner([None, None], "eval_loss")


# ------------------------------------------------------------------------------------------------- the workflow

PARAMS = {"train.learning_rate": [3.0e-4, 2.0e-3], "lora.r": [4, 8]}


def run_sweep(project: Path, config: Path, env: dict, log: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([str(Path(sys.executable).with_name("pyflyte")), "run", "workflows/sweep.py", "sweep",
                               "--config", str(config)], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=1500)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text, time.monotonic() - t0


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, mlflow_server, small_demo):
    root = tmp_path_factory.mktemp("sweep")
    project = snapshot_project(root / "project")
    cfg = quick_pipeline_config(small_demo, root / "outputs", **{"registry.model_name": "sweep-sql",
                                                                "tracking.experiment": "sweep"})
    cfg["sweep"] = {"method": "grid", "params": PARAMS, "metric": "eval_loss"}
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = pyflyte_env(root, mlflow_server)
    first, t_first = run_sweep(project, config, env, root / "first.log")
    second, t_second = run_sweep(project, config, env, root / "second.log")
    return {"first": first, "second": second, "t": (t_first, t_second), "uri": mlflow_server, "cfg": cfg,
            "out": root / "outputs" / cfg["name"]}


def _sweep_run(client, text: str):  # noqa: ANN001
    run_id = re.findall(r"^qloraflow sweep \S+ \((\w+)\)$", text, re.M)[-1]
    return client.get_run(run_id)


@pytest.mark.slow
def test_four_trials_are_nested_runs_of_the_sweep_and_the_winner_is_gated(sweeps):
    from mlflow.tracking import MlflowClient

    from qloraflow import registry
    from qloraflow.compare import pipeline_runs

    client = MlflowClient(sweeps["uri"])
    sweep = _sweep_run(client, sweeps["first"])
    trials = pipeline_runs(client, "sweep", sweep.info.run_id)
    assert len(trials) == 4
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {sweep.info.run_id}
    assert {(t.data.params["train.learning_rate"], t.data.params["lora.r"]) for t in trials} == {
        (lr, r) for lr in ("0.0003", "0.002") for r in ("4", "8")}
    losses = {t.data.tags["sweep.trial"]: t.data.metrics["validation.eval_loss"] for t in trials}
    winner = sweep.data.tags["sweep.winner_trial"]
    assert losses[winner] == min(losses.values())
    assert all(t.info.status == "FINISHED" for t in trials) and sweep.info.status == "FINISHED"

    # the winner went through the pipeline's gate: registered, tested by record id against the base
    decision = json.loads((sweeps["out"] / "runs" / sweep.data.tags["sweep.winner_run_id"] / "summary.json")
                          .read_text())["registry"]
    assert decision["version"] == sweep.data.tags["registry.version"] == "1"
    assert decision["tests"]["base"]["method"] == "mcnemar_exact" and decision["tests"]["base"]["n"] == 8
    assert not decision["promoted"] and "smoke test" in decision["reason"]  # serving is off in this config
    version = registry.client_for(sweeps["uri"]).get_model_version("sweep-sql", "1")
    assert version.run_id == sweep.data.tags["sweep.winner_run_id"]
    assert version.tags["gate.vs_base.method"] == "mcnemar_exact" and version.tags["gate.promoted"] == "False"
    assert sweep.data.tags["gate.vs_base.n"] == "8"
    deck = sweeps["out"] / "runs" / sweep.data.tags["sweep.winner_run_id"] / "evaluation.html"
    assert "Promotion gate on execution_accuracy: not promoted" in deck.read_text()
    assert "[qloraflow:train]" in sweeps["first"] and sweeps["first"].count("[qloraflow:train]") == 4


@pytest.mark.slow
def test_the_second_sweep_trains_nothing_and_registers_nothing(sweeps):
    from mlflow.tracking import MlflowClient

    from qloraflow import registry
    from qloraflow.compare import pipeline_runs

    second = sweeps["second"]
    assert "[qloraflow:train]" not in second and "[qloraflow:data]" not in second  # every stage from the cache
    assert "unchanged: already registered" in second
    client = MlflowClient(sweeps["uri"])
    sweep = _sweep_run(client, second)
    trials = pipeline_runs(client, "sweep", sweep.info.run_id)
    assert len(trials) == 4 and all(t.data.tags["stage.train"].startswith("cached") for t in trials)
    assert sweep.data.tags["sweep.winner_trial"] == _sweep_run(client, sweeps["first"]).data.tags["sweep.winner_trial"]
    assert len(registry.list_versions(registry.client_for(sweeps["uri"]), "sweep-sql")) == 1
    assert sweeps["t"][1] < sweeps["t"][0]


@pytest.mark.slow
def test_compare_shows_the_trials_of_one_sweep(sweeps, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from qloraflow.compare import compare_main

    sweep = _sweep_run(MlflowClient(sweeps["uri"]), sweeps["first"])
    # The compare line the sweep printed, run as the user would: it tables the four trials and plots them.
    printed = re.findall(r"^compare\s+(qloraflow compare .*)$", sweeps["first"], re.M)[-1]
    proc = subprocess.run(["bash", "-c", f"{ROOT}/.venv/bin/{printed}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (printed, proc.stdout, proc.stderr)
    assert len([line for line in proc.stdout.splitlines() if "lora.r=" in line]) == 4, proc.stdout
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # negative control: a sweep id that is not there is an error that lists the sweeps that are
    wrong = printed.replace(f"--sweep {sweep.info.run_id[:8]}", "--sweep ffffffff")
    proc = subprocess.run(["bash", "-c", f"{ROOT}/.venv/bin/{wrong}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "no trials of sweep 'ffffffff'" in proc.stderr, proc.stderr
    assert sweep.info.run_id[:8] in proc.stderr
    png = tmp_path / "trials.png"
    assert compare_main(["--experiment", "sweep", "--tracking-uri", sweeps["uri"], "--sweep", sweep.info.run_id[:8],
                         "--params", "train.learning_rate", "lora.r", "--metrics", "validation.eval_loss",
                         "--sort", "validation.eval_loss", "--ascending", "--out", str(png)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if "lora.r=" in line]
    assert len(rows) == 4, table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
