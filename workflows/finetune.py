"""The ``finetune`` workflow: raw instruction data in, a served, registered, fine-tuned model out.

Run it locally (every task in this process; data, tokenize, train, evaluate, merge and deploy are
cached, so a rerun on unchanged inputs only re-checks the gate)::

    pyflyte run workflows/finetune.py finetune --config configs/tiny.yaml

on a Flyte cluster (each task in its own container, the train task on one 24 GB GPU, or with
``train.num_gpus: N`` on N GPUs of one node through torchrun, see ``tasks/train_elastic.py``)::

    pyflyte run --remote workflows/finetune.py finetune --config configs/llama3-8b-qlora-a10g.yaml

and on a schedule through the launch plans in ``workflows/schedules.py``.
"""

from flytekit import conditional, workflow
from flytekit.types.file import FlyteFile

from tasks.data import prepare_data
from tasks.deploy import deploy_model
from tasks.evaluate import evaluate_candidate
from tasks.export import export_model
from tasks.merge import merge_model
from tasks.register import register_and_promote
from tasks.resolve import resolve_config
from tasks.tokenize import tokenize_data
from tasks.train import train_model
from tasks.train_elastic import TRAIN_ON_GPUS
from workflows.sharded import sharded_data, sharded_tokenize


@workflow
def finetune(config: FlyteFile) -> str:
    """ingest/clean/dedupe -> tokenize -> QLoRA train -> evaluate -> merge -> deploy (and export) -> register/promote."""
    r = resolve_config(config=config)
    # Each stage takes its settings (its cache key, with the folders of the stages before it); how the
    # work is spread (execution) and where it is logged (context) are inputs the cache ignores.
    # data.num_shards / tokenize.num_shards above 1: a map task over shards, the same outputs (workflows/sharded.py).
    spread = dict(execution=r.execution, context=r.context)
    data = (conditional("data").if_(r.data_shards == 1).then(prepare_data(settings=r.data, **spread))
            .else_().then(sharded_data(settings=r.data, **spread, num_shards=r.data_shards)))
    tok_inputs = dict(settings=r.tokenize, data_dir=data.data_dir, **spread)
    tok = (conditional("tokenize").if_(r.tokenize_shards == 1).then(tokenize_data(**tok_inputs))
           .else_().then(sharded_tokenize(**tok_inputs, num_shards=r.tokenize_shards)))
    # train.num_gpus picks the train task: one GPU, or torchrun over N GPUs of one node (tasks/train_elastic.py).
    train_inputs = dict(settings=r.train, tok_dir=tok.tok_dir, **spread)
    train_step = conditional("train").if_(r.num_gpus == 1).then(train_model(**train_inputs))
    for gpus, train_on_gpus in TRAIN_ON_GPUS.items():
        train_step = train_step.elif_(r.num_gpus == gpus).then(train_on_gpus(**train_inputs))
    trained = train_step.else_().fail("train.num_gpus has no train task; resolve_config lists the node sizes")
    evaluated = evaluate_candidate(settings=r.evaluate, data_dir=data.data_dir, tok_dir=tok.tok_dir,
                                   train_dir=trained.train_dir, context=r.context)
    merged = merge_model(settings=r.merge, train_dir=trained.train_dir, data_dir=data.data_dir, tok_dir=tok.tok_dir,
                         candidate=evaluated, context=r.context)
    deployed = deploy_model(settings=r.deploy, merged_dir=merged.merged_dir, merged=merged.result, context=r.context)
    # export.gguf lists GGUF types (empty by default: the task returns at once, skipped); beside deploy.
    exported = export_model(settings=r.export, merged_dir=merged.merged_dir, merged=merged.result, context=r.context)
    return register_and_promote(
        settings=r.register, context=r.context, data=data.result, data_dir=data.data_dir, tokenized=tok.result,
        tok_dir=tok.tok_dir, trained=trained.result, evaluated=evaluated, merged=merged.result,
        merged_dir=merged.merged_dir, deployed=deployed, exported=exported.result)
