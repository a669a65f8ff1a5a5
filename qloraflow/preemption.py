"""Preemption: on SIGTERM the trainer finishes the step in progress, saves a complete checkpoint and stops.

Kubernetes (and so Flyte on a spot node) sends SIGTERM, waits ``terminationGracePeriodSeconds`` (30 s
by default) and then sends SIGKILL. Python's default SIGTERM action ends the process at once, losing
every step since the last periodic checkpoint. :class:`PreemptionGuard` replaces it while training
runs: the handler only sets a flag (a signal handler must not save tensors), and the guard's Trainer
callback turns the flag into ``should_save`` and ``should_training_stop`` at the next step end, so the
Trainer writes ``checkpoint-N`` through the same atomic path as every other checkpoint. The training
function then raises :class:`~qloraflow.errors.PreemptedError`, a retryable error: the retry resumes
from that checkpoint (``qloraflow.checkpoint.latest_complete``)::

    with PreemptionGuard(cfg.train.preemption_grace_s) as guard:
        trainer.add_callback(guard.callback())
        trainer.train(...)
    guard.raise_if_preempted(checkpoints_dir)

``train.preemption_grace_s`` is the time the guard plans for: at SIGTERM it says how long a step and
the last save took against it, and once it has run out before the checkpoint is complete it says
so, naming the checkpoint the retry will fall back to (it does not exit: the pod may have longer).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from qloraflow.errors import PreemptedError


def _say(message: str) -> None:
    print(f"[qloraflow] {message}", flush=True)


class PreemptionGuard:
    """Turns SIGTERM into a checkpoint at the next step end, for the ``with`` block.

    Args:
        grace_s: Seconds between SIGTERM and SIGKILL that the save must fit in
            (``train.preemption_grace_s``).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested_at: Optional[float] = None
        self.step_at_signal: Optional[int] = None
        self.saved_step: Optional[int] = None
        self._state: Any = None  # the Trainer's state, read by the handler for its message
        self._step_started: Optional[float] = None
        self._step_seconds: Optional[float] = None
        self._save_started: Optional[float] = None
        self._save_seconds: Optional[float] = None
        self._previous: Any = None
        self._watchdog: Optional[threading.Timer] = None

    def __enter__(self) -> "PreemptionGuard":
        # Signal handlers can only be set from the main thread; elsewhere the default stays.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            return  # a second SIGTERM changes nothing: the save is on its way
        self.requested_at = time.monotonic()
        done = self._state.global_step if self._state is not None else 0
        self.step_at_signal = done
        timing = (f"a step takes about {self._step_seconds:.1f} s" if self._step_seconds is not None else
                  "no step has finished yet")
        if self._save_seconds is not None:
            timing += f", the last checkpoint took {self._save_seconds:.1f} s to save"
        _say(f"SIGTERM after step {done}: finishing step {done + 1} and saving its checkpoint within "
             f"train.preemption_grace_s={self.grace_s:g} s ({timing})")
        self._watchdog = threading.Timer(self.grace_s, self._grace_over)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _grace_over(self) -> None:
        if self.saved_step is None:
            _say(f"train.preemption_grace_s={self.grace_s:g} s have passed since SIGTERM and the checkpoint is "
                 "not complete yet; if the process is killed now, the retry resumes from the last complete "
                 "checkpoint (lower train.save_steps, or raise the pod's terminationGracePeriodSeconds and "
                 "train.preemption_grace_s together)")

    def callback(self) -> Any:
        """The Trainer callback that saves and stops at the step end after SIGTERM."""
        from transformers import TrainerCallback

        guard = self

        class SaveOnPreemption(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
                guard._state, guard._step_started = state, time.monotonic()

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                guard._state = state
                if guard._step_started is not None:
                    guard._step_seconds = time.monotonic() - guard._step_started
                if _any_rank(guard.requested, args):
                    control.should_save = True
                    control.should_training_stop = True
                    guard.saved_step = None
                    guard._save_started = time.monotonic()
                else:
                    guard._save_started = time.monotonic() if control.should_save else None

            def on_save(self, args, state, control, **kw):  # noqa: ANN001
                if guard._save_started is not None:
                    guard._save_seconds = time.monotonic() - guard._save_started
                if guard.requested:
                    guard.saved_step = state.global_step
                    _say(f"checkpoint-{state.global_step} is complete, "
                         f"{time.monotonic() - guard.requested_at:.1f} s after SIGTERM; stopping")

        return SaveOnPreemption()

    def raise_if_preempted(self, checkpoints_dir: str | Path) -> None:
        """Raise :class:`PreemptedError` when SIGTERM came during the ``with`` block.

        Raises:
            PreemptedError: naming the checkpoint the retry resumes from.
        """
        if not self.requested:
            return
        where = (f"checkpoint-{self.saved_step} was saved in {checkpoints_dir}" if self.saved_step is not None
                 else f"no step finished after it, so the newest checkpoint in {checkpoints_dir} is current")
        raise PreemptedError(f"training was preempted (SIGTERM after step {self.step_at_signal}); {where}; "
                             "run it again with the same output folder to resume from there")


def _any_rank(flag: bool, args: Any) -> bool:
    """Whether any process got SIGTERM: every rank must save (and stop) at the same step."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
