"""The ``qloraflow`` console command as a user types it, against a real MLflow store (SQLite, no mocks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

QLORAFLOW = Path(sys.executable).parent / "qloraflow"
EXPERIMENT = "cli-demo"
MODEL = "cli-sql"
PROMOTE_MODEL = "cli-sql-promote"
DIGEST = "0123456789abcdef" * 4
TIMEOUT_S = 120
EXPECTED_COMMANDS = {"validate", "models", "promote", "rollback", "deploy", "compare"}


def qloraflow(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the installed console script as typed; bounded in time.

    The script imports this checkout's ``qloraflow`` (PYTHONPATH first), not the one the venv was installed
    from: a git worktree shares its venv with the main checkout.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([str(QLORAFLOW), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def subcommands() -> list[str]:
    """Every subcommand the parser defines (so a new one is covered without editing this file)."""
    import argparse

    from qloraflow.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A SQLite MLflow store with two pipeline runs (params, metrics, a nested train run with a loss
    curve) and a registered model: version 1 (the better run, ``champion``) and version 2."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("cli-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    merged = root / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"model_type": "llama"}')
    runs = []
    for i, (lr, exact, loss) in enumerate([(2e-4, 0.75, 0.9), (1e-3, 0.5, 1.4)]):
        run = client.create_run(exp_id, run_name=f"pipeline-{i}",
                                tags={"qloraflow.pipeline": "finetune", "flyte.execution_id": f"exec-{i}"})
        rid = run.info.run_id
        for key, value in {"train.learning_rate": lr, "lora.r": 16, "train.max_steps": 6}.items():
            client.log_param(rid, key, value)
        for key, value in {"base.exact_match": 0.25, "candidate.exact_match": exact,
                           "candidate.heldout_loss": loss}.items():
            client.log_metric(rid, key, value)
        client.log_artifacts(rid, str(merged), "merged_model")
        train = client.create_run(exp_id, run_name=f"train-{i}",
                                  tags={"mlflow.parentRunId": rid, "qloraflow.stage": "train"})
        for step in range(1, 4):
            client.log_metric(train.info.run_id, "loss", 2.0 - step * (0.3 + 0.1 * i), step=step)
        client.set_terminated(train.info.run_id)
        client.set_terminated(rid)
        runs.append(rid)
    client.create_registered_model(MODEL)
    versions = [client.create_model_version(MODEL, f"runs:/{rid}/merged_model", run_id=rid,
                                            tags={"metric.exact_match": str(exact), "model.sha256": digest})
                for rid, exact, digest in ((runs[0], 0.75, DIGEST), (runs[1], 0.5, "f" * 64))]
    client.set_registered_model_alias(MODEL, "champion", versions[0].version)
    assert versions[0].version in (1, "1")
    # A second model for the promote/rollback test, so the other tests' champion never moves.
    client.create_registered_model(PROMOTE_MODEL)
    for rid, exact in ((runs[0], 0.75), (runs[1], 0.5)):
        client.create_model_version(PROMOTE_MODEL, f"runs:/{rid}/merged_model", run_id=rid,
                                    tags={"metric.exact_match": str(exact)})
    client.set_registered_model_alias(PROMOTE_MODEL, "champion", "1")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    return {"uri": uri, "env": env, "runs": runs, "root": root}


# ----------------------------------------------------------------------------- help of every command


def test_top_level_help_lists_every_subcommand():
    proc = qloraflow("-h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: qloraflow")
    assert EXPECTED_COMMANDS <= set(subcommands())
    for name in subcommands():
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.M), f"{name} missing from:\n{proc.stdout}"


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_its_own_help(command):
    for flag in ("-h", "--help"):
        proc = qloraflow(command, flag)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"usage: qloraflow {command}"), proc.stdout
        assert "-h, --help" in proc.stdout


def test_subcommand_help_shows_the_options_of_its_module():
    """deploy and compare take exactly their modules' options (one definition of each)."""
    from qloraflow import compare, deploy

    for command, parser in (("deploy", deploy._parser()), ("compare", compare.build_parser())):
        out = qloraflow(command, "-h").stdout
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in out, f"{command} -h lacks {opt}"


# ----------------------------------------------------------------------------- commands as typed


def test_validate_the_tiny_config():
    proc = qloraflow("validate", "--config-only", "configs/tiny.yaml")  # its files exist once make assets ran
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"^configs/tiny\.yaml: valid \(config hash [0-9a-f]+\)$", proc.stdout.strip()), proc.stdout


def test_validate_a_missing_file_names_the_fix(tmp_path):
    proc = qloraflow("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "file not found" in proc.stderr and "configs/tiny.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compare_an_experiment(store, tmp_path):
    proc = qloraflow("compare", "--experiment", EXPERIMENT, env=store["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "execution"]
    assert {"train.learning_rate", "candidate.exact_match", "candidate.heldout_loss"} <= set(header)
    rows = {line.split()[0]: line for line in lines[2:4]}
    assert set(rows) == {rid[:8] for rid in store["runs"]}
    assert "0.7500" in rows[store["runs"][0][:8]] and "exec-0" in rows[store["runs"][0][:8]]
    assert "0.5000" in rows[store["runs"][1][:8]]
    assert lines[-1] == f"wrote {tmp_path / 'compare.png'}"
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_sorted_with_options_and_tracking_uri_before_the_command(store, tmp_path):
    env = {k: v for k, v in store["env"].items() if k != "MLFLOW_TRACKING_URI"}
    proc = qloraflow("--tracking-uri", store["uri"], "compare", "--experiment", EXPERIMENT, "--params", "lora.r",
                     "--metrics", "candidate.exact_match", "--sort", "candidate.exact_match", "--ascending",
                     "--out", str(tmp_path / "c.png"), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "execution", "lora.r", "candidate.exact_match"]
    assert [line.split()[0] for line in lines[2:4]] == [store["runs"][1][:8], store["runs"][0][:8]]
    assert (tmp_path / "c.png").is_file()


def test_compare_an_unknown_experiment_lists_the_ones_there(store, tmp_path):
    proc = qloraflow("compare", "--experiment", "no-such-exp", env=store["env"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "'no-such-exp' does not exist" in proc.stderr and EXPERIMENT in proc.stderr
    assert "Traceback" not in proc.stderr


def test_models_prints_a_table_with_the_aliases(store):
    proc = qloraflow("models", "--name", MODEL, env=store["env"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{MODEL}: 2 version(s), @champion = version 1; gate metric exact_match"
    assert lines[1].split() == ["version", "aliases", "exact_match", "created", "(UTC)", "digest", "source"]
    v1, v2 = lines[3], lines[4]
    assert v1.split()[:3] == ["1", "@champion", "0.7500"] and DIGEST[:12] in v1 and DIGEST[:13] not in v1
    assert f"runs:/{store['runs'][0][:8]}/merged_model" in v1
    assert v2.split()[:3] == ["2", "-", "0.5000"] and "@" not in v2
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", v1)
    assert "{" not in proc.stdout  # not JSON lines


def test_models_and_promote_use_the_gate_the_pipeline_promoted_with(store, capsys):
    """A promotion records its gate on the registered model; the commands then default to it (in-process:
    the command's parsing is covered above)."""
    from mlflow.tracking import MlflowClient

    from qloraflow import registry
    from qloraflow.cli import main

    name, uri = f"{MODEL}-gate", ["--tracking-uri", store["uri"]]
    client = MlflowClient(store["uri"], store["uri"])
    for rid, (exact, accuracy) in zip(store["runs"], ((0.9, 0.2), (0.1, 0.6))):
        version = registry.register_model(client, name, f"runs:/{rid}/merged_model", rid,
                                          {"metric.exact_match": exact, "metric.execution_accuracy": accuracy})
    registry.promote(client, name, "1", {"execution_accuracy": 0.2}, {}, "execution_accuracy", 0.0, True)
    assert main(uri + ["models", "--name", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("gate metric execution_accuracy") and lines[1].split()[2] == "execution_accuracy"
    assert main(uri + ["models", "--name", name, "--metric", "exact_match"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "exact_match"
    # 0.6 beats 0.2 on the pipeline's gate, though its exact_match (0.1 < 0.9) would not.
    assert main(uri + ["promote", "--name", name, "--version", version]) == 0
    assert str(json.loads(capsys.readouterr().out)["champion"]) == version
    assert main(uri + ["promote", "--name", name, "--version", "1", "--metric", "exact_match"]) == 0


def test_models_json_for_scripts(store):
    proc = qloraflow("models", "--name", MODEL, "--json", env=store["env"])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(str(r["version"]), r["champion"], r["aliases"], r["metric.exact_match"]) for r in rows] == [
        ("1", True, ["champion"], "0.75"), ("2", False, [], "0.5")]
    assert rows[0]["model.sha256"] == DIGEST and rows[0]["run_id"] == store["runs"][0]
    assert isinstance(rows[0]["creation_timestamp"], int)


def test_models_of_an_unknown_name_lists_the_registered_ones(store):
    proc = qloraflow("models", "--name", "nope", env=store["env"])
    assert proc.returncode == 2
    assert "no registered model named 'nope'" in proc.stderr and MODEL in proc.stderr


def test_registry_commands_on_a_missing_store_name_the_fix(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'absent.db'}")
    for args in (["models", "--name", MODEL], ["compare", "--experiment", EXPERIMENT]):
        proc = qloraflow(*args, env=env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout
        assert "does not exist" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr
    assert not (tmp_path / "absent.db").exists()  # nothing created by looking


def test_deploy_dry_run_pins_the_champion_and_its_pods_can_download_it(store, tmp_path):
    proc = qloraflow("deploy", "--target", "k8s", "--model-uri", f"models:/{MODEL}@champion", "--version", "1",
                     "--dry-run", env=store["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout)}
    assert set(docs) == {"ConfigMap", "NetworkPolicy", "Deployment", "Service"}
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"][init["command"].index("--artifact-uri") + 1] == f"models:/{MODEL}/1"
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing
    # The pod's download command, run here against the store: it fetches version 1's files.
    local = tmp_path / pod["containers"][0]["args"][1].lstrip("/")
    cmd = [str(Path(sys.executable).with_name("mlflow")), *init["command"][1:]]
    cmd[cmd.index("--dst-path") + 1] = str(local)
    subprocess.run(cmd, env=store["env"], check=True, capture_output=True, timeout=TIMEOUT_S)
    assert [p.name for p in local.iterdir()] == ["config.json"]


def test_promote_and_rollback_move_the_champion(store):
    from mlflow.tracking import MlflowClient

    env, name = store["env"], PROMOTE_MODEL
    client = MlflowClient(store["uri"], store["uri"])

    def champion() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    proc = qloraflow("promote", "--name", name, "--version", "2", env=env)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["promoted"] is False and champion() == "1"  # 0.5 does not beat 0.75
    proc = qloraflow("promote", "--name", name, "--version", "2", "--force", env=env)
    assert proc.returncode == 0 and "champion -> version 2 (forced)" in proc.stdout and champion() == "2"
    proc = qloraflow("promote", "--name", name, "--version", "9", env=env)
    assert proc.returncode == 2 and "has no version '9'" in proc.stderr
    assert f"qloraflow models --name {name}" in proc.stderr  # the error says how to see the versions
    proc = qloraflow("rollback", "--name", name, env=env)
    assert proc.returncode == 2 and "no earlier champion" in proc.stderr  # v1 got the alias directly, not by promote
    assert qloraflow("promote", "--name", name, "--version", "1", "--force", env=env).returncode == 0
    proc = qloraflow("rollback", "--name", name, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{name}: champion version 1 -> 2" and champion() == "2"


# ----------------------------------------------------------------------------- negative controls


@pytest.mark.parametrize("args", [["models", "--name", MODEL, "--bogus"], ["compare", "--experiment", "e", "--bogus"],
                                  ["deploy", "--dry-run", "--bogus"], ["--bogus", "validate", "configs/tiny.yaml"]])
def test_an_unknown_option_exits_2_and_names_it(args):
    proc = qloraflow(*args)
    assert proc.returncode == 2, proc.stdout
    assert "unrecognized arguments: --bogus" in proc.stderr
    assert proc.stderr.startswith("usage: qloraflow")


def test_an_unknown_subcommand_and_a_missing_one_exit_2():
    proc = qloraflow("frobnicate")
    assert proc.returncode == 2 and "invalid choice: 'frobnicate'" in proc.stderr and "validate" in proc.stderr
    proc = qloraflow()
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr


def test_deploy_requires_a_mode_and_says_which():
    proc = qloraflow("deploy", "--target", "k8s", "--model-uri", f"models:/{MODEL}@champion", "--version", "1")
    assert proc.returncode == 2 and "one of the arguments --dry-run --apply is required" in proc.stderr
