"""A retried train task resumes from Flyte's checkpoint store and continues the same MLflow run.

On a cluster, Flyte runs a task as ``pyflyte-execute ... --checkpoint-path <this attempt's store>
--prev-checkpoint <the previous attempt's store>``. This test runs the train task exactly that way,
from the container arguments of the serialized task: the first attempt is killed with SIGKILL after
it saved a checkpoint; the second attempt is started with the first one's store as its previous
checkpoint, as Flyte does for a retry or after a preemption.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_config

# The train stage's settings need no data digest (its data is the tokenized folder)
NO_FILES = {"data": "", "model": "tiny", "tokenizer": "", "sqlite_db": ""}

pytestmark = pytest.mark.slow


def _container_args(tmp: Path, attempt: int, prev: Path | None) -> list[str]:
    """The train task's serialized container command, with the placeholders Flyte fills in."""
    from flytekit.configuration import ImageConfig, SerializationSettings
    from flytekit.tools.translator import get_serializable

    from tasks.train import train_model

    settings = SerializationSettings(image_config=ImageConfig.auto_default_image(), project="p", domain="d",
                                     version="v")
    args = list(get_serializable(OrderedDict(), settings, train_model).template.container.args)
    values = {"{{.input}}": str(tmp / "inputs.pb"), "{{.outputPrefix}}": str(tmp / f"out-{attempt}"),
              "{{.rawOutputDataPrefix}}": str(tmp / f"raw-{attempt}"),
              "{{.checkpointOutputPrefix}}": str(tmp / f"store-{attempt}"),
              "{{.prevCheckpointPrefix}}": str(prev) if prev else '""'}
    assert set(values) <= set(args), args  # the task is serialized with checkpoint locations to fill
    return [values.get(a, a) for a in args]


def _write_inputs(path: Path, inputs: dict, types: dict) -> None:
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    ctx = FlyteContextManager.current_context()
    literals = TypeEngine.dict_to_literal_map(ctx, inputs, types)
    path.write_bytes(literals.to_flyte_idl().SerializeToString())


def _read_outputs(folder: Path) -> dict:
    from flyteidl.core import literals_pb2

    lm = literals_pb2.LiteralMap()
    lm.ParseFromString((folder / "outputs.pb").read_bytes())
    return {k: v for k, v in lm.literals.items()}


def _read_result(folder: Path, python_type: type):  # noqa: ANN202
    """The task's ``result`` output, as the next task would receive it."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.models.literals import Literal

    literal = Literal.from_flyte_idl(_read_outputs(folder)["result"])
    return TypeEngine.to_python_value(FlyteContextManager.current_context(), literal, python_type)


def test_retried_attempt_resumes_from_the_checkpoint_store_in_the_same_mlflow_run(
        tmp_path, tiny_model_dir, tiny_tokenized, mlflow_server):
    from flytekit.types.directory import FlyteDirectory
    from mlflow.tracking import MlflowClient

    from qloraflow.stages import ExecutionSettings, RunContext, TrainResult, TrainSettings, stage_settings
    from qloraflow.tracking import MlflowTracker

    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 16, "train.save_steps": 2, "train.logging_steps": 1,
                                         "tracking.tracking_uri": mlflow_server, "tracking.experiment": "retry"})
    pipeline = MlflowTracker("retry", mlflow_server, run_name="pipeline")
    context = RunContext(pipeline_run_id=pipeline.run_id, name=cfg.name, experiment="retry", tracking_uri=mlflow_server)
    _write_inputs(tmp_path / "inputs.pb",
                  {"settings": stage_settings(cfg, NO_FILES).train,
                   "tok_dir": FlyteDirectory(str(tiny_tokenized)), "execution": ExecutionSettings(), "context": context},
                  {"settings": TrainSettings, "tok_dir": FlyteDirectory, "execution": ExecutionSettings,
                   "context": RunContext})
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=mlflow_server, HF_HUB_OFFLINE="1")
    pyflyte_execute = str(Path(sys.executable).with_name("pyflyte-execute"))

    # attempt 0: killed (SIGKILL, as a preempted node) once step 4's checkpoint is in the store
    first = subprocess.Popen([pyflyte_execute, *_container_args(tmp_path, 0, None)[1:]], cwd=ROOT, env=env,
                             stdout=open(tmp_path / "attempt-0.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    stored = tmp_path / "store-0" / "checkpoint-4" / "manifest.json"
    deadline = time.monotonic() + 300
    while not stored.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # Killed at once: the store's copy of checkpoint-4 may be cut short, and then fails its manifest on
    # restore and the resume falls back to checkpoint-2; either way no finished step is trained twice.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    log0 = (tmp_path / "attempt-0.log").read_text()
    assert stored.exists(), log0[-4000:]
    assert not (tmp_path / "out-0" / "outputs.pb").exists()
    run_id = (tmp_path / "store-0" / "mlflow_run_id").read_text().strip()

    # attempt 1: Flyte hands it the previous attempt's store
    second = subprocess.run([pyflyte_execute, *_container_args(tmp_path, 1, tmp_path / "store-0")[1:]], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    log1 = second.stdout + second.stderr
    assert second.returncode == 0, log1[-4000:]
    summary = dataclasses.asdict(_read_result(tmp_path / "out-1", TrainResult))
    assert Path(summary["resumed_from"]).name in {"checkpoint-2", "checkpoint-4", "checkpoint-6"}, summary
    assert summary["global_step"] == 16
    assert summary["mlflow_run_id"] == run_id  # the same MLflow run, continued

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == pipeline.run_id
    assert run.data.tags["resumed_from"] == Path(summary["resumed_from"]).name
    steps = sorted({m.step for m in client.get_metric_history(run_id, "loss")})
    assert steps[0] <= 2 and steps[-1] == 16  # loss from before the kill and after the resume, in one run
    train_runs = client.search_runs([run.info.experiment_id], "tags.`qloraflow.stage` = 'train'")
    assert len(train_runs) == 1
