"""A search over config keys: the trials a ``sweep`` section asks for, each trial's config, the winner.

The config's ``sweep`` section (:class:`qloraflow.config.SweepConfig`) names the keys to vary::

    sweep:
      method: grid                 # or random, with num_trials
      params: {train.learning_rate: [1.0e-4, 3.0e-4], lora.r: [4, 8]}
      metric: eval_loss            # the validation loss: lower is better

and ``workflows/sweep.py`` trains one adapter per trial on the shared data and tokenize stages, then
sends the winner through the pipeline's evaluate, merge, deploy and register stages (the gate)::

    from qloraflow.sweep import trial_overrides, trial_config, pick_winner
    overrides = trial_overrides(cfg)          # [{"train.learning_rate": 1e-4, "lora.r": 4}, ...]
    configs = [trial_config(cfg, o) for o in overrides]
    best = pick_winner([0.91, 0.62, None, 0.70], "eval_loss")   # 1
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import shlex
from typing import Any, Optional, Sequence

from qloraflow.config import FinetuneConfig, SweepConfig, config_from_dict
from qloraflow.errors import ConfigError, QloraflowError
from qloraflow.stages import RegisterSettings, RunContext, TrainSettings

LOWER_IS_BETTER = {"eval_loss": True}


class SweepError(QloraflowError, RuntimeError):
    """The sweep cannot pick a winner (no trial has the metric)."""


def trial_overrides(cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """The ``{dotted key: value}`` of each trial, in a stable order (the grid's, with the first key slowest).

    ``random`` draws ``sweep.num_trials`` distinct combinations, seeded by the config's ``seed``, so a
    re-run trains the same trials (and finds them in the cache).

    Raises:
        ConfigError: the config has no ``sweep.params``.
    """
    s = cfg.sweep
    if not s.params:
        raise ConfigError("sweep", ["'sweep.params' is empty; name the keys to vary, e.g. "
                                    "sweep: {params: {train.learning_rate: [1.0e-4, 3.0e-4], lora.r: [4, 8]}}"])
    keys = list(s.params)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(s.params[k] for k in keys))]
    if s.method == "random":
        picked = sorted(random.Random(cfg.seed).sample(range(len(grid)), s.num_trials))
        grid = [grid[i] for i in picked]
    return grid


def trial_config(cfg: FinetuneConfig, overrides: dict[str, Any]) -> FinetuneConfig:
    """``cfg`` with one trial's values set and no ``sweep`` section: the config a plain pipeline run of
    that trial would have, so its stages share Flyte's cache with such a run.

    Raises:
        ConfigError: the combination is invalid (each value was checked alone when the config loaded).
    """
    raw = dataclasses.asdict(dataclasses.replace(cfg, sweep=SweepConfig()))
    for dotted, value in overrides.items():
        sec, key = dotted.split(".", 1)
        raw[sec][key] = value
    return config_from_dict(raw, source=f"sweep trial {trial_label(overrides)}")


def trial_label(overrides: dict[str, Any]) -> str:
    """``train.learning_rate=0.0001 lora.r=4``: how the trial reads in logs, tables and run names."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())


def pick_winner(values: Sequence[Optional[float]], metric: str) -> int:
    """The index of the best trial by ``metric`` (ties: the earlier trial); trials without it are skipped.

    Raises:
        SweepError: no trial has the metric (e.g. validation never ran).
    """
    scored = [(v, i) for i, v in enumerate(values) if v is not None]
    if not scored:
        raise SweepError(f"no trial reported {metric}: with sweep.metric eval_loss each trial must evaluate on the "
                         "validation split (train.eval_steps > 0 and at most train.max_steps, "
                         "data.validation_fraction > 0)")
    lower = LOWER_IS_BETTER.get(metric, False)
    return min(scored, key=lambda x: (x[0] if lower else -x[0], x[1]))[1]


def trials_table(rows: list[dict[str, Any]], metric: str, winner: int) -> str:
    """The trials as the sweep prints them: one line each, the winner marked."""
    keys = list(rows[0]["overrides"]) if rows else []
    head = ["trial", *keys, metric, "steps", "train"]
    body = [[f"{'*' if r['index'] == winner else ' '}{r['index']}", *(str(r["overrides"][k]) for k in keys),
             "-" if r.get(metric) is None else f"{r[metric]:.4f}", str(r.get("global_step")), r.get("provenance", "")]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


@dataclasses.dataclass
class Trial:
    """One trial of a sweep: its values, its training settings, its config for the gate, its MLflow run."""

    index: int
    label: str
    """``train.learning_rate=0.0001 lora.r=4`` (:func:`trial_label`)."""
    overrides: dict
    """``{dotted key: value}`` this trial sets."""
    train: TrainSettings
    register: RegisterSettings
    context: RunContext
    """The trial's pipeline run, nested under the sweep's run; its stage runs nest under it."""



def compare_command(experiment: str, tracking_uri: str, sweep_run_id: str, params: Sequence[str], metric: str) -> str:
    """The ``qloraflow compare`` line that tables and plots one sweep's trials (the sweep prints it).

    >>> compare_command("demo", "sqlite:///m.db", "0d24b52e9f", ["lora.r"], "eval_loss")
    'qloraflow compare --experiment demo --tracking-uri sqlite:///m.db --sweep 0d24b52e --params lora.r --metrics validation.eval_loss --sort validation.eval_loss --ascending'
    """
    column = f"validation.{metric}"
    return (f"qloraflow compare --experiment {shlex.quote(experiment)} --tracking-uri {shlex.quote(tracking_uri)} "
            f"--sweep {sweep_run_id[:8]} --params {' '.join(shlex.quote(p) for p in params)} "
            f"--metrics {column} --sort {column} --ascending")
