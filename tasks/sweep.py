"""Sweep tasks: open the sweep's MLflow run and one nested run per trial; pick the winner; close the sweep.

None is cached: like ``resolve_config`` they open and close runs, and they are cheap. The trials'
own work is the pipeline's cached stage tasks (``workflows/sweep.py``).
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from qloraflow import registry
from qloraflow.config import load_config
from qloraflow.errors import ConfigError
from qloraflow.preflight import check_launch
from qloraflow.stages import (DataSettings, DeploySettings, EvalSettings, ExecutionSettings, ExportSettings,
                              MergeSettings, RegisterSettings, RunContext, TokenizeSettings, TrainResult, stage_settings)
from qloraflow.sweep import Trial, compare_command, pick_winner, trial_config, trial_label, trial_overrides, trials_table
from qloraflow.tracking import MlflowTracker, check_reachable, resolve_tracking_uri
from tasks import policy
from tasks.common import execution_id, print_line
from tasks.resolve import environment_tags, input_fingerprints, run_name, source_tags

SweepResolved = typing.NamedTuple("SweepResolved", [
    ("data", DataSettings), ("tokenize", TokenizeSettings), ("evaluate", EvalSettings), ("merge", MergeSettings),
    ("deploy", DeploySettings), ("export", ExportSettings), ("execution", ExecutionSettings), ("context", RunContext),
    ("trials", list[Trial]), ("metric", str)])
Winner = typing.NamedTuple("Winner", [("train_dir", FlyteDirectory), ("result", TrainResult),
                                      ("register", RegisterSettings), ("context", RunContext), ("table", str)])


def _flat(cfg) -> dict:  # noqa: ANN001
    return {f"{sec}.{k}": v for sec, vals in cfg.to_dict().items() if isinstance(vals, dict) and sec != "sweep"
            for k, v in vals.items()}


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES)
def resolve_sweep(config: FlyteFile) -> SweepResolved:
    """Validate the config and its sweep, fingerprint the inputs, open the sweep's run and each trial's."""
    cfg = load_config(config.download())
    if not cfg.sweep.params:
        raise ConfigError(config.path, ["'sweep.params' is empty; workflows/sweep.py needs keys to vary, e.g. "
                                        "sweep: {params: {train.learning_rate: [1.0e-4, 3.0e-4], lora.r: [4, 8]}}"])
    if cfg.train.num_gpus != 1:
        raise ConfigError(config.path, ["'train.num_gpus' must be 1 in a sweep (each trial trains on one GPU)"])
    check_launch(cfg, config.path)
    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))
    fp = input_fingerprints(cfg)
    overrides = trial_overrides(cfg)
    configs = [trial_config(cfg, o) for o in overrides]  # a bad combination fails here, naming the trial
    settings = [stage_settings(c, fp) for c in configs]
    for stage in ("data", "tokenize", "evaluate", "merge", "deploy", "export"):  # what the trials share
        assert all(getattr(s, stage) == getattr(settings[0], stage) for s in settings), stage
    environment = environment_tags()
    tags = {**source_tags(environment["git.commit"]), "mlflow.source.name": "workflows/sweep.py"}
    name = run_name(f"{cfg.name}-sweep")
    common = {"flyte.execution_id": execution_id(), "qloraflow.name": cfg.name, "dataset.hash": fp["data"],
              "model.base": cfg.model.base_model, "model.fingerprint": fp["model"], **environment, **tags}
    sweep = MlflowTracker(cfg.tracking.experiment, cfg.tracking.tracking_uri, run_name=name,
                          tags={**common, "qloraflow.pipeline": "sweep", "sweep.method": cfg.sweep.method,
                                "sweep.metric": cfg.sweep.metric, "sweep.trials": len(overrides)})
    sweep.log_params({**{f"sweep.params.{k}": json.dumps(v) for k, v in cfg.sweep.params.items()},
                      "sweep.method": cfg.sweep.method, "sweep.metric": cfg.sweep.metric})
    sweep.log_dict(cfg.to_dict(), "config.json")
    trials = []
    for i, (o, c, s) in enumerate(zip(overrides, configs, settings)):
        trial_name = f"{name}-trial{i}"
        run = MlflowTracker(cfg.tracking.experiment, cfg.tracking.tracking_uri, run_name=trial_name,
                            parent_run_id=sweep.run_id,
                            tags={**common, "qloraflow.pipeline": "finetune", "qloraflow.sweep": sweep.run_id,
                                  "sweep.trial": i, "sweep.label": trial_label(o), "config.hash": c.hash()})
        run.log_params({**_flat(c), "name": c.name, "seed": c.seed})
        run.log_dict(c.to_dict(), "config.json")
        trials.append(Trial(index=i, label=trial_label(o), overrides=o, train=s.train, register=s.register,
                            context=RunContext(pipeline_run_id=run.run_id, name=c.name,
                                               experiment=cfg.tracking.experiment,
                                               tracking_uri=cfg.tracking.tracking_uri, run_name=trial_name,
                                               tags=tags)))
    print_line("sweep", f"{len(trials)} trials ({cfg.sweep.method}) of {', '.join(cfg.sweep.params)}; "
                        f"MLflow run {name} ({sweep.run_id})")
    first = settings[0]
    context = RunContext(pipeline_run_id=sweep.run_id, name=cfg.name, experiment=cfg.tracking.experiment,
                         tracking_uri=cfg.tracking.tracking_uri, run_name=name, tags=tags)
    return SweepResolved(data=first.data, tokenize=first.tokenize, evaluate=first.evaluate, merge=first.merge,
                         deploy=first.deploy, export=first.export, execution=first.execution, context=context, trials=trials,
                         metric=cfg.sweep.metric)


def _provenance(client, result: TrainResult, trial: Trial) -> str:  # noqa: ANN001
    try:
        parent = client.get_run(result.mlflow_run_id).data.tags.get("mlflow.parentRunId")
    except Exception:  # noqa: BLE001 - a deleted run: the adapter still came from the cache
        parent = None
    return "ran" if parent == trial.context.pipeline_run_id else f"cached (computed by trial run {str(parent)[:8]})"


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES)
def pick_trial(trials: list[Trial], results: list[TrainResult], train_dirs: list[FlyteDirectory],
               context: RunContext, metric: str) -> Winner:
    """The best trial by the validation metric; every trial's run gets its metric and whether it won."""
    values = [r.best_eval_loss for r in results]  # sweep.metric eval_loss (the only one, see SWEEP_METRICS)
    best = pick_winner(values, metric)
    client = registry.client_for(context.tracking_uri)
    rows = []
    for trial, result, value in zip(trials, results, values):
        rows.append({"index": trial.index, "label": trial.label, "overrides": trial.overrides, metric: value,
                     "global_step": result.global_step, "train_loss_last": result.train_loss_last,
                     "run_id": trial.context.pipeline_run_id, "provenance": _provenance(client, result, trial)})
        run = MlflowTracker(context.experiment, context.tracking_uri, run_id=trial.context.pipeline_run_id)
        run.log_metrics({f"validation.{metric}": value} if value is not None else {})
        run.log_metrics({"train.loss_last": result.train_loss_last} if result.train_loss_last is not None else {})
        run.set_tags({"sweep.winner": trial.index == best, "stage.train": rows[-1]["provenance"]})
        if trial.index != best:
            run.close()  # the winner's run stays open: the gate's stages log into it and register closes it
    table = trials_table(rows, metric, best)
    sweep = MlflowTracker(context.experiment, context.tracking_uri, run_id=context.pipeline_run_id)
    sweep.log_dict({"metric": metric, "winner": best, "trials": rows}, "sweep/trials.json")
    sweep.set_tags({"sweep.winner_trial": best, "sweep.winner_run_id": trials[best].context.pipeline_run_id,
                    "sweep.winner_label": trials[best].label})
    if values[best] is not None:
        sweep.log_metrics({f"best.validation.{metric}": values[best]})
    print_line("sweep", f"winner: trial {best} ({trials[best].label}), {metric} {values[best]:.4f}\n{table}")
    return Winner(train_dir=train_dirs[best], result=results[best], register=trials[best].register,
                  context=trials[best].context, table=table)


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES)
def finish_sweep(context: RunContext, winner: RunContext, register: RegisterSettings, table: str,
                 summary: str) -> str:
    """The gate's decision on the sweep's run, ``outputs/<name>/sweeps/<sweep run>/sweep.json``; the text."""
    cfg = register.config
    root = Path(cfg.output_dir) / cfg.name
    # The decision as register left it on the winner's run (on a cluster this task's pod has no summary file).
    client = registry.client_for(context.tracking_uri)
    tags = client.get_run(winner.pipeline_run_id).data.tags
    decision = {k: v for k, v in tags.items() if k.startswith(("registry.", "gate."))}
    sweep = MlflowTracker(context.experiment, context.tracking_uri, run_id=context.pipeline_run_id)
    sweep.set_tags(decision)
    sweep.close()
    params = client.get_run(context.pipeline_run_id).data.params  # what resolve_sweep logged: the keys varied
    compare = compare_command(context.experiment, resolve_tracking_uri(context.tracking_uri), context.pipeline_run_id,
                              sorted(k[len("sweep.params."):] for k in params if k.startswith("sweep.params.")),
                              params["sweep.metric"])
    own = root / "sweeps" / context.pipeline_run_id
    own.mkdir(parents=True, exist_ok=True)
    (own / "sweep.json").write_text(json.dumps({"sweep_run_id": context.pipeline_run_id, "winner_run_id":
                                                winner.pipeline_run_id, "table": table, "registry": decision},
                                               indent=1, default=str))
    return (f"\nqloraflow sweep {context.run_name} ({context.pipeline_run_id})\n{table}\n"
            f"sweep     {own / 'sweep.json'}\ncompare   {compare}\n"
            f"the winner through the gate:{summary}")

