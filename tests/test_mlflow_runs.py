"""What a person sees in MLflow: a model-training experiment, per-step series apart from single summaries."""

from __future__ import annotations


def test_training_logs_series_and_summaries_under_distinct_names(tmp_path, tiny_model_dir, tiny_tokenized):
    from mlflow.tracking import MlflowClient

    from conftest import tiny_config
    from qloraflow.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker
    from qloraflow.train import SUMMARY_METRICS, train_adapter

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker("series", uri, run_name="train", fallback_dir=tmp_path)
    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 4, "train.eval_steps": 2})
    train_adapter(cfg, tiny_tokenized, tmp_path / "out", tracker=tracker)
    tracker.close()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    # the UI opens this experiment on runs and models, not on the GenAI overview
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    steps = {k: sorted({m.step for m in client.get_metric_history(run.info.run_id, k)}) for k in run.data.metrics}
    summaries = {k for k, s in steps.items() if s == [0]}
    series = {k for k, s in steps.items() if 0 not in s}
    assert set(SUMMARY_METRICS.values()) <= summaries  # one value each, at no training step
    assert summaries | series == set(steps)  # no name mixes a step-0 summary into a per-step series
    assert {"loss", "eval_loss", "tokens_per_s", "learning_rate"} <= series and steps["loss"] == [1, 2, 3, 4]
    assert not {"train_loss", "train_runtime_loss", "train_runtime", "train_tokens_per_second"} & set(steps)
