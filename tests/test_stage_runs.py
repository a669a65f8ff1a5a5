"""Every stage's MLflow run ends: FINISHED when the stage returns, FAILED (with the error) when it raises."""

from __future__ import annotations

from pathlib import Path

import pytest


def _runs_of(uri: str, experiment: str, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`qloraflow.stage` = '{stage}'")


def test_a_failing_stage_leaves_its_run_failed_not_running(tmp_path, monkeypatch, tiny_model_dir):
    from flytekit.types.directory import FlyteDirectory

    from conftest import tiny_config, write_splits
    from qloraflow.stages import ExecutionSettings, RunContext, TokenizeSettings
    from qloraflow.tracking import MlflowTracker
    from tasks.tokenize import tokenize_data

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("HOME", str(tmp_path))  # Flyte's local cache
    cfg = tiny_config(tiny_model_dir, **{"tracking.tracking_uri": uri, "tracking.experiment": "stage-runs",
                                         "model.base_model": str(tmp_path / "no-such-model")})
    pipeline = MlflowTracker("stage-runs", uri, run_name="pipeline")
    data = write_splits(tmp_path / "data")
    context = RunContext(pipeline_run_id=pipeline.run_id, name=cfg.name, experiment="stage-runs", tracking_uri=uri)

    def settings(c, key: str) -> TokenizeSettings:  # noqa: ANN001
        return TokenizeSettings(tokenize=c.tokenize, base_model=c.model.base_model, tokenizer_digest=key)

    with pytest.raises(Exception, match="no-such-model"):
        tokenize_data(settings=settings(cfg, "failing"), data_dir=FlyteDirectory(str(data)),
                      execution=ExecutionSettings(), context=context)
    (run,) = _runs_of(uri, "stage-runs", "tokenize")
    assert run.info.status == "FAILED"  # not RUNNING for good
    assert "no-such-model" in run.data.tags["qloraflow.error"]
    # the same stage with a model that exists ends FINISHED (the control)
    ok = tiny_config(tiny_model_dir, **{"tracking.tracking_uri": uri, "tracking.experiment": "stage-runs"})
    tokenize_data(settings=settings(ok, "passing"), data_dir=FlyteDirectory(str(data)),
                  execution=ExecutionSettings(), context=context)
    statuses = sorted(r.info.status for r in _runs_of(uri, "stage-runs", "tokenize"))
    assert statuses == ["FAILED", "FINISHED"]
    # The pipeline's run ended FAILED with the stage (a local run has no retries to wait for).
    from mlflow.tracking import MlflowClient

    failed_pipeline = MlflowClient(uri).get_run(pipeline.run_id)
    assert failed_pipeline.info.status == "FAILED"
    assert failed_pipeline.data.tags["qloraflow.failed_stage"] == "tokenize"
    assert "no-such-model" in failed_pipeline.data.tags["qloraflow.error"]


def test_a_failed_data_stage_keeps_its_quarantine_and_report_in_mlflow(tmp_path, monkeypatch):
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from qloraflow.config import DataConfig
    from qloraflow.errors import DataValidationError
    from qloraflow.stages import DataSettings, ExecutionSettings, RunContext
    from qloraflow.tracking import MlflowTracker
    from tasks.data import prepare_data

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("HOME", str(tmp_path))
    rows = [{"instruction": "What is 1 plus 2?", "output": "3"}] + [{"instruction": f"x{i}"} for i in range(3)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipeline = MlflowTracker("stage-runs", uri, run_name="pipeline")
    context = RunContext(pipeline_run_id=pipeline.run_id, name="t", experiment="stage-runs", tracking_uri=uri)
    settings = DataSettings(data=DataConfig(train_files=[str(src)], validation_fraction=0.0), seed=0,
                            data_digest="too-many-rejects")
    with pytest.raises(DataValidationError, match="3 of 4 records"):
        prepare_data(settings=settings, execution=ExecutionSettings(), context=context)
    (run,) = _runs_of(uri, "stage-runs", "data")
    assert run.info.status == "FAILED" and "3 of 4 records" in run.data.tags["qloraflow.error"]
    got = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data",
                                                   dst_path=str(tmp_path / "got"), tracking_uri=uri))
    quarantine = [json.loads(line) for line in (got / "quarantine.jsonl").read_text().splitlines()]
    assert [q["reason"] for q in quarantine] == ["missing_field"] * 3
    assert json.loads((got / "report.json").read_text())["rejected"] == 3
    assert MlflowClient(uri).get_run(pipeline.run_id).info.status == "FAILED"


def test_a_failing_shard_of_a_map_task_ends_the_pipeline_run_failed(tmp_path, monkeypatch):
    """A shard task has no MLflow run of its own; when it fails for good the pipeline's run must not stay RUNNING."""
    import json

    from mlflow.tracking import MlflowClient

    from qloraflow.config import DataConfig
    from qloraflow.stages import DataSettings, ExecutionSettings, RunContext
    from qloraflow.tracking import MlflowTracker
    from tasks.data import plan_data_shards, prepare_data_shard

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("HOME", str(tmp_path))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"What is {i} plus 2?", "output": str(i + 2)}) + "\n"
                           for i in range(40)))
    settings = DataSettings(data=DataConfig(train_files=[str(src)], validation_fraction=0.0), seed=0,
                            data_digest="shard-fails")
    client = MlflowClient(uri)

    def pipeline_run() -> RunContext:
        run = MlflowTracker("stage-runs", uri, run_name="pipeline")
        return RunContext(pipeline_run_id=run.run_id, name="t", experiment="stage-runs", tracking_uri=uri)

    # control: a shard that works leaves the pipeline's run open (RUNNING) for the stages after it
    ok = pipeline_run()
    shards = plan_data_shards(settings=settings, num_shards=2, context=ok)
    assert len(shards) == 2
    prepare_data_shard(settings=settings, execution=ExecutionSettings(), context=ok, shard=shards[0])
    assert client.get_run(ok.pipeline_run_id).info.status == "RUNNING"
    # the input vanishes between the plan and the shard (a cleaned-up volume): the shard fails for good
    failing = pipeline_run()
    src.unlink()
    with pytest.raises(Exception):
        prepare_data_shard(settings=settings, execution=ExecutionSettings(), context=failing, shard=shards[1])
    run = client.get_run(failing.pipeline_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["qloraflow.failed_stage"].startswith("data shard")
    # and a plan that cannot read its inputs ends the run FAILED too, naming the stage
    planning = pipeline_run()
    uncached = DataSettings(data=settings.data, seed=0, data_digest="shard-fails-plan")  # not the first plan's key
    with pytest.raises(Exception, match="d.jsonl"):
        plan_data_shards(settings=uncached, num_shards=2, context=planning)
    run = client.get_run(planning.pipeline_run_id)
    assert run.info.status == "FAILED" and run.data.tags["qloraflow.failed_stage"] == "data"
