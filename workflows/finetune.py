"""The ``finetune`` workflow: raw instruction data in, a served, registered, fine-tuned model out.

Run it locally (every task in this process; data, tokenize, train, evaluate, merge and deploy are
cached, so a rerun on unchanged inputs only re-checks the gate)::

    pyflyte run workflows/finetune.py finetune --config configs/tiny.yaml

on a Flyte cluster (each task in its own container, the train task on one 24 GB GPU)::

    pyflyte run --remote workflows/finetune.py finetune --config configs/llama3-8b-qlora-a10g.yaml

and on a schedule through the launch plans in ``workflows/schedules.py``.
"""

from flytekit import workflow
from flytekit.types.file import FlyteFile

from tasks.data import prepare_data
from tasks.deploy import deploy_model
from tasks.evaluate import evaluate_candidate
from tasks.merge import merge_model
from tasks.register import register_and_promote
from tasks.resolve import resolve_config
from tasks.tokenize import tokenize_data
from tasks.train import train_model


@workflow
def finetune(config: FlyteFile) -> str:
    """ingest/clean/dedupe -> tokenize -> QLoRA train -> evaluate -> merge -> deploy -> register/promote."""
    r = resolve_config(config=config)
    data = prepare_data(config_yaml=r.config_yaml, data_key=r.data_key, pipeline_run_id=r.pipeline_run_id)
    tok = tokenize_data(config_yaml=r.config_yaml, tokenize_key=r.tokenize_key, data_dir=data.data_dir,
                        pipeline_run_id=r.pipeline_run_id)
    trained = train_model(config_yaml=r.config_yaml, train_key=r.train_key, tok_dir=tok.tok_dir,
                          pipeline_run_id=r.pipeline_run_id)
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
