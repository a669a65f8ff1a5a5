"""Every stage's MLflow run ends: FINISHED when the stage returns, FAILED (with the error) when it raises."""

from __future__ import annotations

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
