"""What every stage task does the same way: open its MLflow stage run, find its input folders."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from flytekit import Deck, current_context
from flytekit.deck.deck import TimeLineDeck
from flytekit.types.directory import FlyteDirectory

from qloraflow.stages import RunContext
from qloraflow.tracking import MlflowTracker


def execution_id() -> str:
    """The Flyte execution id (``local`` names local runs the same way)."""
    try:
        return current_context().execution_id.name
    except Exception:  # noqa: BLE001 - outside a Flyte context (library use)
        return "none"


def stage_tracker(context: RunContext, stage: str, run_id: Optional[str] = None,
                  fallback_dir: Optional[str] = None) -> MlflowTracker:
    """A nested MLflow run for one stage under the pipeline's run, named ``<pipeline run name>-<stage>``,
    with the execution's source, user and git tags."""
    return MlflowTracker(context.experiment, context.tracking_uri, run_id=run_id,
                         run_name=f"{context.run_name or context.name}-{stage}", parent_run_id=context.pipeline_run_id,
                         tags={**context.tags, "qloraflow.stage": stage, "flyte.execution_id": execution_id()},
                         fallback_dir=fallback_dir or work_dir(stage))


@contextmanager
def stage_run(context: RunContext, stage: str, **kw) -> Iterator[MlflowTracker]:  # noqa: ANN003
    """A stage's MLflow run around its work: started before it, ended FINISHED after it, or FAILED
    (with the error as the ``qloraflow.error`` tag) when the work raises, so no run is left RUNNING."""
    tracker = stage_tracker(context, stage, **kw)
    try:
        yield tracker
    except BaseException as e:
        tracker.set_tags({"qloraflow.error": f"{type(e).__name__}: {e}"[:4000]})
        tracker.close("FAILED")
        raise
    tracker.close()


def local_folder(folder: FlyteDirectory) -> str:
    """A task input folder on this machine, without copying it when it already is (a local run's outputs).

    A remote run downloads it; a local run reads the earlier task's output where Flyte put it, which
    spares a 16 GB merged model one more copy on the disk.
    """
    source = folder.remote_source or ""
    return source if "://" not in source and os.path.isdir(source) else folder.download()


def work_dir(stage: str) -> Path:
    """A fresh folder in the task's working directory for outputs that Flyte then uploads."""
    path = Path(current_context().working_directory) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_line(stage: str, text: str) -> None:
    print(f"[qloraflow:{stage}] {text}", flush=True)


def show_deck(tabs: dict[str, str]) -> None:
    """This task's Deck tabs (name -> HTML), and only this task's.

    A local execution runs every task in one process, and flytekit's ``ExecutionParameters.Builder``
    hands each task the same ``decks`` list object (``self.decks = current._decks``), so without this
    each task's ``deck.html`` would also carry every earlier task's tabs. The earlier tabs are
    dropped here (their pages are written already); flytekit's own timeline, one shared object, stays.
    On a cluster each task runs in its own pod and the list starts empty anyway.
    """
    decks = current_context().decks
    timeline = [d for d in decks if isinstance(d, TimeLineDeck)][:1]
    decks[:] = timeline
    for name, page in tabs.items():
        Deck(name, page)
