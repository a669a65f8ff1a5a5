"""The ``sweep`` workflow: one adapter per combination of the config's ``sweep.params``, the best by
validation loss through the pipeline's own gate.

Run it locally (the trials one after another in this process; every stage is the pipeline's cached
task, so a re-run on unchanged inputs trains nothing, and a trial with the values of an earlier
plain pipeline run finds its adapter in the cache)::

    pyflyte run workflows/sweep.py sweep --config configs/tiny-sweep.yaml
    qloraflow compare --experiment qloraflow-demo --sweep <sweep run id> --metrics validation.eval_loss

and on a cluster with ``pyflyte run --remote``, where the trials train in parallel, each on its own GPU.

data -> tokenize (once, shared) -> train x N (a dynamic workflow, one node per trial) -> pick the
winner by ``sweep.metric`` -> evaluate -> merge -> deploy (and export) -> register/promote -> the sweep's summary.
MLflow: one sweep run; under it one run per trial (tagged ``qloraflow.pipeline: finetune`` like a
pipeline run, so ``qloraflow compare`` lists it) with its stage runs under it.
"""

import typing

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from qloraflow.stages import ExecutionSettings, TrainResult
from qloraflow.sweep import Trial
from tasks.data import prepare_data
from tasks.deploy import deploy_model
from tasks.evaluate import evaluate_candidate
from tasks.export import export_model
from tasks.merge import merge_model
from tasks.register import register_and_promote
from tasks.sweep import finish_sweep, pick_trial, resolve_sweep
from tasks.tokenize import tokenize_data
from tasks.train import train_model

TrialsOutput = typing.NamedTuple("TrialsOutput", [("train_dirs", list[FlyteDirectory]), ("results", list[TrainResult])])


@dynamic
def train_trials(trials: list[Trial], tok_dir: FlyteDirectory, execution: ExecutionSettings) -> TrialsOutput:
    """One cached train task per trial, each logging under its trial's MLflow run."""
    outs = [train_model(settings=t.train, tok_dir=tok_dir, execution=execution, context=t.context) for t in trials]
    return TrialsOutput(train_dirs=[o.train_dir for o in outs], results=[o.result for o in outs])


@workflow
def sweep(config: FlyteFile) -> str:
    """resolve -> data -> tokenize -> train each trial -> pick by validation metric -> the pipeline's gate."""
    r = resolve_sweep(config=config)
    spread = dict(execution=r.execution, context=r.context)
    data = prepare_data(settings=r.data, **spread)
    tok = tokenize_data(settings=r.tokenize, data_dir=data.data_dir, **spread)
    trained = train_trials(trials=r.trials, tok_dir=tok.tok_dir, execution=r.execution)
    w = pick_trial(trials=r.trials, results=trained.results, train_dirs=trained.train_dirs, context=r.context,
                   metric=r.metric)
    evaluated = evaluate_candidate(settings=r.evaluate, data_dir=data.data_dir, tok_dir=tok.tok_dir,
                                   train_dir=w.train_dir, context=w.context)
    merged = merge_model(settings=r.merge, train_dir=w.train_dir, data_dir=data.data_dir, tok_dir=tok.tok_dir,
                         candidate=evaluated, context=w.context)
    deployed = deploy_model(settings=r.deploy, merged_dir=merged.merged_dir, merged=merged.result, context=w.context)
    exported = export_model(settings=r.export, merged_dir=merged.merged_dir, merged=merged.result, context=w.context)
    summary = register_and_promote(
        settings=w.register, context=w.context, data=data.result, data_dir=data.data_dir, tokenized=tok.result,
        tok_dir=tok.tok_dir, trained=w.result, evaluated=evaluated, merged=merged.result,
        merged_dir=merged.merged_dir, deployed=deployed, exported=exported.result)
    return finish_sweep(context=r.context, winner=w.context, register=w.register, table=w.table, summary=summary)
