"""The data and tokenize stages over shards: a plan, a map task (one pod per shard), one merge.

``workflows/finetune.py`` runs these instead of the single data (tokenize) task when
``data.num_shards`` (``tokenize.num_shards``) is above 1; the outputs are the same files, so every
later stage is unaware of it. Each task is cached like the single one (``tasks/policy.py``): a
rerun on unchanged inputs runs no shard again. Run one on its own (the data stage's outputs print)::

    pyflyte run workflows/sharded.py sharded_data --config_yaml "$(cat configs/tiny.yaml)" \\
        --data_key manual --pipeline_run_id none --num_shards 4
"""

import functools

from flytekit import map_task, workflow
from flytekit.types.directory import FlyteDirectory

from tasks.data import DataOutput, merge_data_shards, plan_data_shards, prepare_data_shard
from tasks.tokenize import TokenizeOutput, merge_tokenize_shards, plan_tokenize_shards, tokenize_shard


@workflow
def sharded_data(config_yaml: str, data_key: str, pipeline_run_id: str, num_shards: int) -> DataOutput:
    """plan -> read/clean/check/MinHash each shard -> dedupe, split and report over all, in input order."""
    shards = plan_data_shards(config_yaml=config_yaml, data_key=data_key, num_shards=num_shards)
    parts = map_task(functools.partial(prepare_data_shard, config_yaml=config_yaml, data_key=data_key))(shard=shards)
    return merge_data_shards(config_yaml=config_yaml, data_key=data_key, parts=parts, pipeline_run_id=pipeline_run_id)


@workflow
def sharded_tokenize(config_yaml: str, tokenize_key: str, data_dir: FlyteDirectory, pipeline_run_id: str,
                     num_shards: int) -> TokenizeOutput:
    """plan -> encode each shard -> length policy, packing and saving per split, in data order."""
    shards = plan_tokenize_shards(config_yaml=config_yaml, tokenize_key=tokenize_key, data_dir=data_dir,
                                  num_shards=num_shards)
    parts = map_task(functools.partial(tokenize_shard, config_yaml=config_yaml, tokenize_key=tokenize_key,
                                       data_dir=data_dir))(shard=shards)
    return merge_tokenize_shards(config_yaml=config_yaml, tokenize_key=tokenize_key, data_dir=data_dir, parts=parts,
                                 pipeline_run_id=pipeline_run_id)
