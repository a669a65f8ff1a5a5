"""What every stage task does the same way: open its MLflow stage run, find its input folders."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from flytekit import Deck, current_context
from flytekit.deck.deck import TimeLineDeck
from flytekit.types.directory import FlyteDirectory

from qloraflow.stages import RunContext
from qloraflow.tracking import MlflowTracker, end_run
from tasks import policy


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
def stage_run(context: RunContext, stage: str, reports: Iterable[Path] = (),
              **kw) -> Iterator[MlflowTracker]:  # noqa: ANN003
    """A stage's MLflow run around its work: started before it, ended FINISHED after it, or FAILED
    when the work raises, so no run is left RUNNING.

    On a failure the stage's run gets the error as the ``qloraflow.error`` tag and the ``reports``
    that exist (a failed data stage's quarantine and report say why it failed), and the pipeline's run
    is ended FAILED too, naming the stage, unless Flyte will retry the task (``fail_pipeline_run``).
    """
    tracker = stage_tracker(context, stage, **kw)
    try:
        yield tracker
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"[:4000]
        for path in reports:
            if Path(path).exists():
                tracker.log_artifact(path, stage)
        tracker.set_tags({"qloraflow.error": error})
        tracker.close("FAILED")
        if not will_retry(e):
            fail_pipeline_run(context, stage, error)
        raise
    tracker.close()


@contextmanager
def fails_the_pipeline_run(context: RunContext, stage: str) -> Iterator[None]:
    """Around a task with no run of its own (a shard of a map task, a plan): when it raises and Flyte will
    not retry it, the pipeline's run ends FAILED naming ``stage``, so it is not left RUNNING."""
    try:
        yield
    except BaseException as e:
        if not will_retry(e):
            fail_pipeline_run(context, stage, f"{type(e).__name__}: {e}"[:4000])
        raise


def will_retry(e: BaseException) -> bool:
    """True when Flyte runs this task again after ``e``: a recoverable error before the last attempt.

    On a cluster ``FLYTE_ATTEMPT_NUMBER`` counts attempts from 0; a local run has no retries.
    """
    from flytekit.exceptions.user import FlyteRecoverableException

    attempt = os.environ.get("FLYTE_ATTEMPT_NUMBER")
    return isinstance(e, FlyteRecoverableException) and attempt is not None and int(attempt) < policy.RETRIES


def fail_pipeline_run(context: RunContext, stage: str, error: str) -> None:
    """End the pipeline's MLflow run FAILED, with the stage that failed and its error as tags.

    With the server down, the end is buffered (``qloraflow.tracking.end_run``) and replayed later.
    Never raises: the stage's own error is what the user must see.
    """
    if not context.pipeline_run_id:
        return
    try:
        end_run(context.experiment, context.tracking_uri, context.pipeline_run_id, "FAILED",
                {"qloraflow.failed_stage": stage, "qloraflow.error": error}, work_dir("pipeline-run"))
    except Exception as e:  # noqa: BLE001 - tracking trouble must not hide the stage's error
        print(f"[qloraflow] WARNING: could not end the pipeline run {context.pipeline_run_id} FAILED "
              f"({type(e).__name__}: {e})", flush=True)


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
