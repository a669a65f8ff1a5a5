"""Registry and promotion gate against a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import json
import multiprocessing as mp
import uuid

import pytest

from qloraflow import registry
from qloraflow.errors import RegistryError
from qloraflow.tracking import MlflowTracker


def _register(uri: str, name: str, metric: float, tmp: str) -> str:
    tracker = MlflowTracker("registry-tests", uri, run_name=f"{name}-{metric}", fallback_dir=tmp)
    path = f"{tmp}/model-{uuid.uuid4().hex}.txt"
    with open(path, "w") as f:
        f.write(f"weights {metric}")
    tracker.log_artifact(path, "merged_model")
    tracker.close()
    client = registry.client_for(uri)
    return registry.register_model(client, name, f"runs:/{tracker.run_id}/merged_model", tracker.run_id,
                                   {"metric.exact_match": metric})


def _register_and_promote(uri: str, name: str, metric: float, tmp: str, out) -> None:  # noqa: ANN001
    version = _register(uri, name, metric, tmp)
    client = registry.client_for(uri)
    d = registry.promote(client, name, version, {"exact_match": metric}, {"exact_match": 0.0}, "exact_match",
                         0.0, smoke_passed=True)
    out.put((version, d["promoted"]))


def test_gate_promotes_better_refuses_worse_and_rolls_back(mlflow_server, tmp_path):
    name = f"gate-{uuid.uuid4().hex[:6]}"
    client = registry.client_for(mlflow_server)
    v1 = _register(mlflow_server, name, 0.5, str(tmp_path))
    d = registry.promote(client, name, v1, {"exact_match": 0.5}, {"exact_match": 0.0}, "exact_match", 0.0, True)
    assert d["promoted"] and registry.champion(client, name).version == v1

    v2 = _register(mlflow_server, name, 0.4, str(tmp_path))
    d = registry.promote(client, name, v2, {"exact_match": 0.4}, {"exact_match": 0.0}, "exact_match", 0.0, True)
    assert not d["promoted"] and "does not beat champion v" in d["reason"]
    assert registry.champion(client, name).version == v1

    v3 = _register(mlflow_server, name, 0.9, str(tmp_path))
    d = registry.promote(client, name, v3, {"exact_match": 0.9}, {"exact_match": 0.0}, "exact_match", 0.0,
                         smoke_passed=False)
    assert not d["promoted"] and "smoke test" in d["reason"]
    d = registry.promote(client, name, v3, {"exact_match": 0.9}, {"exact_match": 0.95}, "exact_match", 0.0, True)
    assert not d["promoted"] and "base" in d["reason"]
    d = registry.promote(client, name, v3, {"exact_match": 0.9}, {"exact_match": 0.0}, "exact_match", 0.0, True)
    assert d["promoted"] and registry.champion(client, name).version == v3

    assert registry.rollback(client, name) == {"from": v3, "to": v1}
    assert registry.champion(client, name).version == v1
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(client, name)


def test_concurrent_promotions_leave_one_champion_and_every_version(mlflow_server, tmp_path):
    name = f"race-{uuid.uuid4().hex[:6]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_register_and_promote, args=(mlflow_server, name, m, str(tmp_path), out))
             for m in (0.6, 0.8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = dict(out.get(timeout=5) for _ in procs)
    client = registry.client_for(mlflow_server)
    versions = registry.list_versions(client, name)
    assert len(versions) == 2  # no version lost
    champions = [v for v in versions if v["champion"]]
    assert len(champions) == 1  # never two champions
    assert champions[0]["metric.exact_match"] == "0.8"  # and the better one holds it
    assert any(results.values())


def _register_once(uri: str, name: str, digest: str, tmp: str, start, out) -> None:  # noqa: ANN001
    tracker = MlflowTracker("registry-tests", uri, run_name=f"{name}-once", fallback_dir=tmp)
    tracker.close()
    client = registry.client_for(uri)
    start.wait(60)  # both processes check and register at the same moment
    out.put(registry.register_once(client, name, digest, f"runs:/{tracker.run_id}/merged_model", tracker.run_id,
                                   {"metric.exact_match": 0.5}))


def test_the_same_model_registered_at_once_by_two_executions_gets_one_version(mlflow_server, tmp_path):
    name = f"once-{uuid.uuid4().hex[:6]}"
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_register_once, args=(mlflow_server, name, "d" * 64, str(tmp_path), start, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [out.get(timeout=5) for _ in procs]
    assert sorted(created for _, created in results) == [False, True]
    assert len({version for version, _ in results}) == 1
    client = registry.client_for(mlflow_server)
    assert len(registry.list_versions(client, name)) == 1
    run = MlflowTracker("registry-tests", mlflow_server, run_name=f"{name}-later", fallback_dir=str(tmp_path))
    run.close()
    source = f"runs:/{run.run_id}/merged_model"
    again = registry.register_once(client, name, "d" * 64, source, run.run_id, {})
    assert again == (results[0][0], False)  # a later execution with the same model adds nothing
    _, created = registry.register_once(client, name, "e" * 64, source, run.run_id, {})
    assert created and len(registry.list_versions(client, name)) == 2  # a different model is a new version


def test_cli_lists_promotes_and_rolls_back(mlflow_server, tmp_path, capsys):
    from qloraflow.cli import main

    name = f"cli-{uuid.uuid4().hex[:6]}"
    v1 = _register(mlflow_server, name, 0.5, str(tmp_path))
    v2 = _register(mlflow_server, name, 0.7, str(tmp_path))
    uri = ["--tracking-uri", mlflow_server]
    assert main(uri + ["promote", "--name", name, "--version", v1]) == 0
    assert main(uri + ["promote", "--name", name, "--version", v2]) == 0
    capsys.readouterr()
    assert main(uri + ["models", "--name", name, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["champion"]) for r in listing] == [(v1, False), (v2, True)]  # v2 is champion
    assert main(uri + ["rollback", "--name", name]) == 0
    assert f"champion version {v2} -> {v1}" in capsys.readouterr().out
    assert main(uri + ["promote", "--name", name, "--version", v1]) == 1  # does not beat itself: gate refuses
    assert main(uri + ["rollback", "--name", name]) == 2  # nothing earlier: a clear error, not a traceback
    assert "no earlier champion" in capsys.readouterr().err
