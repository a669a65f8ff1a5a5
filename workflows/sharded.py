"""The data and tokenize stages over shards: a plan, a map task (one pod per shard), one merge.

``workflows/finetune.py`` runs these instead of the single data (tokenize) task when
``data.num_shards`` (``tokenize.num_shards``) is above 1; the outputs are the same files, so every
later stage is unaware of it. Each task is cached like the single one (``tasks/policy.py``): a
rerun on unchanged inputs runs no shard again. Run one on its own from Python (the data stage's
outputs print)::

    from qloraflow.config import load_config
    from qloraflow.stages import RunContext, stage_settings
    from tasks.resolve import input_fingerprints
    s = stage_settings(cfg := load_config("configs/tiny.yaml"), input_fingerprints(cfg))
    print(sharded_data(settings=s.data, execution=s.execution, num_shards=4,
                       context=RunContext(pipeline_run_id="none", name=cfg.name, experiment="qloraflow")))
"""

import functools

from flytekit import map_task, workflow
from flytekit.types.directory import FlyteDirectory

from qloraflow.stages import DataSettings, ExecutionSettings, RunContext, TokenizeSettings
from tasks.data import DataOutput, merge_data_shards, plan_data_shards, prepare_data_shard
from tasks.tokenize import TokenizeOutput, merge_tokenize_shards, plan_tokenize_shards, tokenize_shard


@workflow
def sharded_data(settings: DataSettings, execution: ExecutionSettings, context: RunContext,
                 num_shards: int) -> DataOutput:
    """plan -> read/clean/check/MinHash each shard -> dedupe, split and report over all, in input order."""
    shards = plan_data_shards(settings=settings, num_shards=num_shards, context=context)
    parts = map_task(functools.partial(prepare_data_shard, settings=settings, execution=execution,
                                       context=context))(shard=shards)
    return merge_data_shards(settings=settings, execution=execution, parts=parts, context=context)


@workflow
def sharded_tokenize(settings: TokenizeSettings, data_dir: FlyteDirectory, execution: ExecutionSettings,
                     context: RunContext, num_shards: int) -> TokenizeOutput:
    """plan -> encode each shard -> length policy, packing and saving per split, in data order."""
    shards = plan_tokenize_shards(settings=settings, data_dir=data_dir, num_shards=num_shards, context=context)
    parts = map_task(functools.partial(tokenize_shard, settings=settings, data_dir=data_dir,
                                       execution=execution, context=context))(shard=shards)
    return merge_tokenize_shards(settings=settings, data_dir=data_dir, parts=parts, execution=execution,
                                 context=context)
