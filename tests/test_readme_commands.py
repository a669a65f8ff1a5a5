"""Every ``qloraflow`` command README.md shows, run as typed: a subprocess of the installed console script,
from a folder laid out like the checkout, against the MLflow store ``make demo`` leaves there (SQLite,
``mlflow.db`` in the working directory, no ``--tracking-uri``), with real registered versions.

A command added to a README code block is run here too, so one that does not work fails this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

README = ROOT / "README.md"
SCRIPT = ROOT / ".venv" / "bin" / "qloraflow"
TIMEOUT_S = 120
# What the commands write: these stay in the temporary folder; everything else is the checkout's, linked.
WRITTEN = {"outputs", "mlflow.db", "mlartifacts", "mlruns", "compare.png", "build"}
COMMAND = re.compile(r"^\s*(?:\$\s+)?((?:\S*/)?qloraflow\s.*)$")


def commands_in(markdown: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of each ``qloraflow ...`` line inside a fenced code block.

    A ``$`` prompt is dropped; a line ending in ``\\`` continues on the next.
    """
    found, fence, pending = [], None, None
    for number, line in enumerate(markdown.splitlines(), 1):
        marker = re.match(r"^\s*(`{3,}|~{3,})", line)
        if marker and (fence is None or marker[1][0] == fence[0] and len(marker[1]) >= len(fence)):
            fence, pending = (marker[1] if fence is None else None), None
            continue
        if fence is None:
            continue
        if pending is not None:
            pending = (pending[0], pending[1][:-1] + " " + line.strip())
        elif m := COMMAND.match(line):
            pending = (number, m[1].rstrip())
        if pending is not None and not pending[1].endswith("\\"):
            found.append(pending)
            pending = None
    return found


README_COMMANDS = commands_in(README.read_text())


def subcommand(command: str) -> str:
    """``.venv/bin/qloraflow --tracking-uri X models --name a`` -> ``models``."""
    words = command.split()[1:]
    while words and words[0].startswith("-"):
        words = words[1:] if "=" in words[0] or words[0] in ("-h", "--help") else words[2:]
    return words[0] if words else ""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, small_demo) -> Path:
    """A folder like the checkout after ``make demo`` twice and one more training run.

    ``build/demo`` holds demo assets (``make assets``' files, fewer records), so ``validate`` finds the
    files the config names.

    The demo config's experiment holds two pipeline runs (params, metrics, a nested train run with a loss
    curve); its registered model holds three versions registered and gated by the pipeline's own registry
    functions: v1 and v2 promoted in turn (v2 is champion), v3 better on the gate metric and not yet
    promoted. So each README command works on its own and in the README's order (promote v3, then roll
    back to v2).
    """
    from mlflow.tracking import MlflowClient

    from qloraflow import registry
    from qloraflow.config import load_config

    folder = tmp_path_factory.mktemp("checkout")
    for entry in ROOT.iterdir():
        if entry.name not in WRITTEN:
            (folder / entry.name).symlink_to(entry)
    (folder / "build").mkdir()
    (folder / "build" / "demo").symlink_to(small_demo)
    if not SCRIPT.is_file():  # no console script installed here: the same entry point through python -m
        shim = folder / "bin" / "qloraflow"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qloraflow.cli "$@"\n')
        shim.chmod(0o755)

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    gate_metric = cfg.eval.gate_metric
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=str(folder / "mlartifacts"))
    weights = folder / "merged"
    weights.mkdir()
    (weights / "config.json").write_text('{"model_type": "llama"}')
    runs = []
    for i in range(3):
        run = client.create_run(exp_id, run_name=f"{cfg.name}-{i}",
                                tags={"qloraflow.pipeline": "finetune", "flyte.execution_id": f"exec-{i}"})
        rid = run.info.run_id
        for key, value in {"train.learning_rate": cfg.train.learning_rate, "lora.r": cfg.lora.r,
                           "train.max_steps": cfg.train.max_steps}.items():
            client.log_param(rid, key, value)
        for key, value in {"base.exact_match": 0.1, "candidate.exact_match": 0.3 + 0.1 * i,
                           "candidate.heldout_loss": 1.5 - 0.2 * i}.items():
            client.log_metric(rid, key, value)
        train = client.create_run(exp_id, run_name="train",
                                  tags={"mlflow.parentRunId": rid, "qloraflow.stage": "train"})
        for step in range(1, 4):
            client.log_metric(train.info.run_id, "loss", 2.0 - step * 0.3, step=step)
        client.set_terminated(train.info.run_id)
        client.log_artifacts(rid, str(weights), "merged_model")
        client.set_terminated(rid)
        runs.append(rid)
    for i, rid in enumerate(runs):
        metrics = {"exact_match": 0.3 + 0.1 * i, gate_metric: 0.4 + 0.1 * i}
        tags = {"model.sha256": f"{i}" * 64, **{f"metric.{k}": v for k, v in metrics.items()}}
        version = registry.register_model(client, cfg.registry.model_name, f"runs:/{rid}/merged_model", rid, tags)
        if i < 2:
            decision = registry.promote(client, cfg.registry.model_name, version, metrics, {gate_metric: 0.0},
                                        gate_metric, cfg.registry.promotion_margin, smoke_passed=True)
            assert decision["promoted"], decision
    assert version == "3"
    return folder


def run_as_typed(command: str, folder: Path) -> subprocess.CompletedProcess:
    """``command`` through a shell in ``folder``, as a user types it there; the store is the folder's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = os.pathsep.join([str(folder / "bin"), str(SCRIPT.parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["QLORAFLOW_TRACKING_PENDING"] = str(folder / ".mlflow-pending")  # a fresh machine's: no buffers pending
    if not SCRIPT.is_file():
        command = re.sub(r"^\S*/qloraflow\b", "qloraflow", command)  # the shim on PATH instead
    return subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_the_readme_is_scanned():
    assert len(README_COMMANDS) >= 6
    assert {subcommand(c) for _, c in README_COMMANDS} >= {"validate", "models", "promote", "rollback", "deploy",
                                                            "compare"}


@pytest.mark.parametrize("command", [c for _, c in README_COMMANDS],
                         ids=[f"README.md:{n}:{subcommand(c)}" for n, c in README_COMMANDS])
def test_every_readme_command_works_as_typed(command, checkout):
    proc = run_as_typed(command, checkout)
    shown = f"README command `{command}` (run in {checkout}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, shown
    assert proc.stdout.strip() and "Traceback" not in proc.stderr and "error:" not in proc.stderr, shown
    what = subcommand(command)
    if what == "models":
        assert re.search(r"^version\s+aliases\s", proc.stdout, re.M) and "@champion" in proc.stdout, shown
    elif what == "deploy" and "--dry-run" in command:
        kinds = [m["kind"] for m in yaml.safe_load_all(proc.stdout) if m]
        assert {"Deployment", "InferenceService"} & set(kinds), shown
    elif what == "compare":
        assert (checkout / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shown


# ----------------------------------------------------------------------------- negative controls


def test_the_scan_finds_commands_only_in_code_blocks():
    text = "\n".join([
        "Run `qloraflow models --name x` (inline: not a block).",
        "qloraflow validate outside.yaml",
        "```bash",
        "$ .venv/bin/qloraflow models --name a   # a comment",
        "qloraflow compare --experiment e \\",
        "    --sort candidate.exact_match",
        "python -m qloraflow.compare --experiment e",
        "pyflyte run --project qloraflow x",
        "```",
        "qloraflow rollback --name after",
        "~~~",
        "qloraflow deploy --dry-run",
        "~~~",
    ])
    assert commands_in(text) == [(4, ".venv/bin/qloraflow models --name a   # a comment"),
                                 (5, "qloraflow compare --experiment e  --sort candidate.exact_match"),
                                 (12, "qloraflow deploy --dry-run")]


def test_a_broken_command_fails_the_same_check(checkout):
    proc = run_as_typed(".venv/bin/qloraflow compare --experiment qloraflow-demo --sortt x", checkout)  # a typo
    assert proc.returncode == 2 and "unrecognized arguments: --sortt x" in proc.stderr, proc.stderr
