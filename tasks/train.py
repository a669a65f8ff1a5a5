"""Train task: QLoRA on one 24 GB GPU, resumable from Flyte's checkpoint store.

A retried or preempted attempt restores the checkpoints the previous attempt saved, resumes from the
newest complete one and continues the same MLflow run (its id is kept beside the checkpoints).
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

from flytekit import current_context, task
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory

from qloraflow import lineage
from qloraflow.errors import PreemptedError
from qloraflow.modelcard import adapter_card, write_adapter_card
from qloraflow.reports import page_html, train_html
from qloraflow.stages import ExecutionSettings, RunContext, TrainResult, TrainSettings
from qloraflow.train import train_adapter
from tasks import policy
from tasks.common import print_line, show_deck, stage_run, work_dir

TrainOutput = typing.NamedTuple("TrainOutput", [("train_dir", FlyteDirectory), ("result", TrainResult)])
RUN_ID_FILE = "mlflow_run_id"


@task(cache=policy.cache("train"), container_image=policy.TRAIN_IMAGE, requests=policy.TRAIN_RESOURCES,
      accelerator=policy.TRAIN_ACCELERATOR, interruptible=policy.TRAIN_INTERRUPTIBLE, retries=policy.RETRIES,
      enable_deck=True)
def train_model(settings: TrainSettings, tok_dir: FlyteDirectory, execution: ExecutionSettings,
                context: RunContext) -> TrainOutput:
    """Train the adapter; returns the training folder (``adapter/``, ``train_result.json``) and what it did."""
    cfg = settings.config(execution)
    out = work_dir("train")
    store = current_context().checkpoint
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    restored = store.restore(checkpoints) if store is not None else None  # the previous attempt's, if any
    run_file = checkpoints / RUN_ID_FILE
    run_id = run_file.read_text().strip() if restored and run_file.exists() else None

    def save_checkpoints(folder: Path) -> None:
        if store is not None:
            store.save(folder)

    with stage_run(context, "train", run_id=run_id) as tracker:  # FAILED on any error
        run_file.write_text(tracker.run_id)
        tok = tok_dir.download()
        data = lineage.read_description(tok)  # the data stage's splits, carried by tokenize
        if run_id is None:  # a resumed attempt's run has them already
            tracker.log_inputs(lineage.dataset_inputs(data, ["train", "validation"], context.name, tok))
        try:
            summary = train_adapter(cfg, tok, out, tracker=tracker, on_checkpoint=save_checkpoints)
        except (ConnectionError, TimeoutError) as e:  # storage or network blips: the retry resumes
            raise FlyteRecoverableException(f"training interrupted by {type(e).__name__}: {e}") from e
        except PreemptedError as e:  # SIGTERM (spot node reclaimed): its checkpoint is in the store
            raise FlyteRecoverableException(str(e)) from e
        # in place of PEFT's empty card: base model, data, settings (register adds the results)
        write_adapter_card(out / "adapter", adapter_card(context.name, cfg, summary, data))
        tracker.log_artifact(out / "adapter", "adapter")
    shutil.rmtree(checkpoints, ignore_errors=True)  # in the checkpoint store already; keep the output small
    summary["mlflow_run_id"] = tracker.run_id
    history = out / "log_history.json"
    page = train_html(summary, json.loads(history.read_text()) if history.exists() else [])
    show_deck({"training": page})
    print_line("train", f"{summary['global_step']} steps, loss {summary['train_loss_first']:.3f} -> "
                        f"{summary['train_loss_last']:.3f} in {summary['train_seconds']:.0f}s")
    return TrainOutput(train_dir=FlyteDirectory(str(out)), result=TrainResult.of(summary, tracker.run_id,
                                                                                   page_html("train", page)))
