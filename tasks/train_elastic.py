"""Train task on N GPUs of one node: torchrun through Flyte's PyTorch plugin (``Elastic``).

``train.num_gpus: N`` in the config is the one switch: the workflow sends the train step to the task
for N GPUs here instead of ``tasks.train.train_model``. Flyte starts one pod with N GPUs; in it,
flytekit starts N worker processes with ``torch.distributed.elastic`` (what ``torchrun
--nproc-per-node N`` does) and every worker runs the same ``train_adapter``, which joins the process
group from torchrun's environment and trains with DDP (or FSDP, ``train.distributed``).

Rank 0 runs ``train_model``'s own body: it opens the MLflow run, saves checkpoints to Flyte's
checkpoint store, and its outputs are the task's, so evaluation, merge and deploy do not know how
many GPUs trained the adapter. The other ranks restore the same checkpoints and only train.

A single-node Elastic task reads its process count from this module inside the pod, so it cannot be
changed per execution: there is one task per node size in ``policy.MULTI_GPU_COUNTS``.
"""

from __future__ import annotations

import os

from flytekit import current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from qloraflow.stages import ExecutionSettings, RunContext, TrainResult, TrainSettings
from qloraflow.train import train_adapter
from tasks import policy
from tasks.common import work_dir
from tasks.train import TrainOutput, train_model


def on_gpus(gpus: int):  # noqa: ANN201 - a flytekit task decorator
    """The train task's policy, for ``gpus`` worker processes (one per GPU) in one pod."""
    return task(task_config=Elastic(nnodes=1, nproc_per_node=gpus), cache=policy.cache("train"),
                container_image=policy.TRAIN_IMAGE, requests=policy.train_resources(gpus),
                accelerator=policy.TRAIN_ACCELERATOR, interruptible=policy.TRAIN_INTERRUPTIBLE,
                retries=policy.RETRIES, shared_memory=True)  # NCCL exchanges through /dev/shm


def train_on_this_rank(settings: TrainSettings, tok_dir: FlyteDirectory, execution: ExecutionSettings,
                       context: RunContext) -> TrainOutput:
    """One worker's part: rank 0 is ``train_model``; the others train without side effects."""
    cfg = settings.config(execution)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.num_gpus != world:
        raise ValueError(f"'train.num_gpus' is {cfg.train.num_gpus} but this task runs {world} processes; "
                         "the workflow picks the task from train.num_gpus")
    if int(os.environ.get("RANK", "0")) == 0:
        return train_model.task_function(settings=settings, tok_dir=tok_dir, execution=execution, context=context)
    out = work_dir("train")  # this worker's own folder
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        current_context().checkpoint.restore(checkpoints)  # rank 0's checkpoints: resume from the same step
    except NotImplementedError:  # no checkpoint store in this execution
        pass
    summary = train_adapter(cfg, tok_dir.download(), out)
    return TrainOutput(train_dir=FlyteDirectory(str(out)), result=TrainResult.of(summary))  # not used


@on_gpus(2)
def train_model_2gpu(settings: TrainSettings, tok_dir: FlyteDirectory, execution: ExecutionSettings,
                     context: RunContext) -> TrainOutput:
    """Train the adapter on 2 GPUs of one node; the outputs are ``train_model``'s."""
    return train_on_this_rank(settings, tok_dir, execution, context)


@on_gpus(4)
def train_model_4gpu(settings: TrainSettings, tok_dir: FlyteDirectory, execution: ExecutionSettings,
                     context: RunContext) -> TrainOutput:
    """Train the adapter on 4 GPUs of one node; the outputs are ``train_model``'s."""
    return train_on_this_rank(settings, tok_dir, execution, context)


@on_gpus(8)
def train_model_8gpu(settings: TrainSettings, tok_dir: FlyteDirectory, execution: ExecutionSettings,
                     context: RunContext) -> TrainOutput:
    """Train the adapter on 8 GPUs of one node; the outputs are ``train_model``'s."""
    return train_on_this_rank(settings, tok_dir, execution, context)


# The train task for each node size, as the workflow picks them by train.num_gpus.
TRAIN_ON_GPUS = {2: train_model_2gpu, 4: train_model_4gpu, 8: train_model_8gpu}
