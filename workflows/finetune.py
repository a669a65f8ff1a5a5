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
from tasks.merge import merge_model
from tasks.register import register_and_promote
from tasks.resolve import resolve_config
from tasks.tokenize import tokenize_data
from tasks.train import train_model
from tasks.train_elastic import TRAIN_ON_GPUS
from workflows.sharded import sharded_data, sharded_tokenize


@workflow
def finetune(config: FlyteFile) -> str:
    """ingest/clean/dedupe -> tokenize -> QLoRA train -> evaluate -> merge -> deploy -> register/promote."""
    r = resolve_config(config=config)
    # data.num_shards / tokenize.num_shards above 1: a map task over shards, the same outputs (workflows/sharded.py).
    data_inputs = dict(config_yaml=r.config_yaml, data_key=r.data_key, pipeline_run_id=r.pipeline_run_id)
    data = (conditional("data").if_(r.data_shards == 1).then(prepare_data(**data_inputs))
            .else_().then(sharded_data(**data_inputs, num_shards=r.data_shards)))
    tok_inputs = dict(config_yaml=r.config_yaml, tokenize_key=r.tokenize_key, data_dir=data.data_dir,
                      pipeline_run_id=r.pipeline_run_id)
    tok = (conditional("tokenize").if_(r.tokenize_shards == 1).then(tokenize_data(**tok_inputs))
           .else_().then(sharded_tokenize(**tok_inputs, num_shards=r.tokenize_shards)))
    # train.num_gpus picks the train task: one GPU, or torchrun over N GPUs of one node (tasks/train_elastic.py).
    train_inputs = dict(config_yaml=r.config_yaml, train_key=r.train_key, tok_dir=tok.tok_dir,
                        pipeline_run_id=r.pipeline_run_id)
    train_step = conditional("train").if_(r.num_gpus == 1).then(train_model(**train_inputs))
    for gpus, train_on_gpus in TRAIN_ON_GPUS.items():
        train_step = train_step.elif_(r.num_gpus == gpus).then(train_on_gpus(**train_inputs))
    trained = train_step.else_().fail("train.num_gpus has no train task; resolve_config lists the node sizes")
    evaluated = evaluate_candidate(config_yaml=r.config_yaml, eval_key=r.eval_key, data_dir=data.data_dir,
                                   tok_dir=tok.tok_dir, train_dir=trained.train_dir,
                                   pipeline_run_id=r.pipeline_run_id)
    merged = merge_model(config_yaml=r.config_yaml, merge_key=r.merge_key, train_dir=trained.train_dir,
                         data_dir=data.data_dir, tok_dir=tok.tok_dir, candidate_metrics=evaluated.metrics,
                         pipeline_run_id=r.pipeline_run_id)
    deployed = deploy_model(config_yaml=r.config_yaml, serve_key=r.serve_key, merged_dir=merged.merged_dir,
                            merge_report=merged.report, pipeline_run_id=r.pipeline_run_id)
    return register_and_promote(
        config_yaml=r.config_yaml, pipeline_run_id=r.pipeline_run_id, train_key=r.train_key, eval_key=r.eval_key,
        data_key=r.data_key, data_report=data.report, tok_report=tok.report, train_summary=trained.summary,
        eval_metrics=evaluated.metrics, merge_report=merged.report, deploy_report=deployed.report,
        merged_dir=merged.merged_dir, data_dir=data.data_dir, tok_dir=tok.tok_dir)
