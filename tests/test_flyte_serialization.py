"""Cluster readiness: what a Flyte cluster would receive, read off the serialized protobufs."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.models.task import Resources
from flytekit.tools.translator import get_serializable

from tasks import policy
from tasks.data import prepare_data
from tasks.deploy import deploy_model
from tasks.evaluate import evaluate_candidate
from tasks.merge import merge_model
from tasks.register import register_and_promote
from tasks.resolve import resolve_config
from tasks.tokenize import tokenize_data
from tasks.train import train_model
from tasks.train_elastic import TRAIN_ON_GPUS
from workflows.finetune import finetune
from workflows.schedules import nightly_retrain, retrain_on_new_data

SETTINGS = SerializationSettings(image_config=ImageConfig.auto_default_image(), project="qloraflow",
                                 domain="development", version="test")


def serialize(entity):
    return get_serializable(OrderedDict(), SETTINGS, entity)


def requests(template) -> dict:
    names = {Resources.ResourceName.CPU: "cpu", Resources.ResourceName.MEMORY: "memory",
             Resources.ResourceName.GPU: "gpu"}
    return {names.get(r.name, r.name): r.value for r in template.container.resources.requests}


def test_train_task_asks_for_one_a10g_and_is_interruptible_cached_and_retried():
    t = serialize(train_model).template
    assert requests(t)["gpu"] == "1" and requests(t)["memory"] == "48Gi"
    assert t.extended_resources.gpu_accelerator.device == "nvidia-a10g"
    assert t.metadata.interruptible is True and t.metadata.retries.retries == policy.RETRIES
    assert t.metadata.discoverable is True and t.metadata.discovery_version == policy.code_version("train")
    assert t.metadata.cache_serializable is True
    assert t.container.image == policy.TRAIN_IMAGE


@pytest.mark.parametrize("task,image", [
    (resolve_config, policy.DATA_IMAGE), (prepare_data, policy.DATA_IMAGE), (tokenize_data, policy.DATA_IMAGE),
    (evaluate_candidate, policy.TRAIN_IMAGE), (merge_model, policy.TRAIN_IMAGE), (deploy_model, policy.SERVE_IMAGE),
    (register_and_promote, policy.DATA_IMAGE)])
def test_every_task_names_its_image_and_resources(task, image):
    t = serialize(task).template
    assert t.container.image == image
    assert "cpu" in requests(t) and "memory" in requests(t)


def test_cache_ignores_bookkeeping_inputs_and_versions_follow_the_code():
    t = serialize(prepare_data).template
    assert set(t.metadata.cache_ignore_input_vars) == {"execution", "context"}
    versions = [policy.code_version(s) for s in policy.ORDER]
    assert len(set(versions)) == len(versions)  # each stage has its own version
    assert serialize(register_and_promote).template.metadata.discoverable is False  # the gate always runs


def test_workflow_and_schedules_serialize():
    wf = serialize(finetune)
    nodes = {n.id: n for n in wf.template.nodes}
    assert {n.metadata.name for n in nodes.values()} >= {"resolve_config", "train", "export_model"}
    assert len(nodes) == 9  # resolve, data, tokenize, train, evaluate, merge, deploy, export, register
    for lp, cron in ((nightly_retrain, "0 2 * * *"), (retrain_on_new_data, "0 * * * *")):
        spec = serialize(lp)
        assert spec.spec.entity_metadata.schedule.cron_schedule.schedule == cron
        assert "config" in spec.spec.fixed_inputs.literals


@pytest.mark.parametrize("gpus", policy.MULTI_GPU_COUNTS)
def test_multi_gpu_train_tasks_run_torchrun_in_one_pod_with_their_gpus(gpus):
    from flytekitplugins.kfpytorch import Elastic

    task = TRAIN_ON_GPUS[gpus]
    # What flytekit launches inside the pod: one worker process per GPU, one node.
    assert task.task_config == Elastic(nnodes=1, nproc_per_node=gpus)
    t = serialize(task).template
    # A single-node Elastic task is a plain pod (no PyTorchJob): its container re-imports the task,
    # Elastic config included, and starts the workers itself.
    assert (t.type, t.task_type_version) == ("python-task", 1) and not t.custom
    assert t.container.args[-4:] == ["task-module", "tasks.train_elastic", "task-name", f"train_model_{gpus}gpu"]
    assert requests(t)["gpu"] == str(gpus) and requests(t)["cpu"] == str(6 * gpus)
    assert requests(t)["memory"] == f"{40 * gpus}Gi"
    assert t.extended_resources.gpu_accelerator.device == "nvidia-a10g"
    assert t.extended_resources.shared_memory.mount_path == "/dev/shm"  # NCCL's transport between the GPUs
    assert t.container.image == policy.TRAIN_IMAGE
    assert t.metadata.interruptible is True and t.metadata.retries.retries == policy.RETRIES
    assert t.metadata.discoverable is True and t.metadata.discovery_version == policy.code_version("train")
    # The same interface as the one-GPU task: later stages cannot tell them apart.
    assert t.interface == serialize(train_model).template.interface


def test_workflow_picks_the_train_task_by_num_gpus():
    entities = OrderedDict()
    wf = get_serializable(entities, SETTINGS, finetune)
    (node,) = [n for n in wf.template.nodes if n.metadata.name == "train"]
    branch = node.branch_node.if_else
    cases = [branch.case, *branch.other]
    picks = {c.condition.comparison.right_value.primitive.integer: c.then_node.task_node.reference_id.name
             for c in cases}
    assert all(c.condition.comparison.left_value.var == "n0.num_gpus" for c in cases)  # resolve_config's output
    assert picks == {1: "tasks.train.train_model", **{n: f"tasks.train_elastic.train_model_{n}gpu"
                                                       for n in policy.MULTI_GPU_COUNTS}}
    assert "train.num_gpus" in branch.error.message
    # Every branch's task travels with the workflow, with its resources and image.
    templates = {e.template.id.name: e.template for e in entities.values() if hasattr(e, "template")
                 and hasattr(e.template, "container")}
    for n in policy.MULTI_GPU_COUNTS:
        t = templates[f"tasks.train_elastic.train_model_{n}gpu"]
        assert requests(t)["gpu"] == str(n) and t.container.image == policy.TRAIN_IMAGE
    assert tuple(TRAIN_ON_GPUS) == policy.MULTI_GPU_COUNTS


def test_pyflyte_package_serializes_every_task_workflow_and_launch_plan(tmp_path):
    """What `pyflyte register` would upload, made by the real CLI and read back from the archive."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2

    root = Path(__file__).resolve().parent.parent
    archive = tmp_path / "flyte-package.tgz"
    subprocess.run([str(Path(sys.executable).with_name("pyflyte")), "--pkgs", "workflows", "package", "--image",
                    "ghcr.io/qloraflow/data:default", "--output", str(archive), "--force"],
                   cwd=root, check=True, capture_output=True, timeout=300)
    tasks, workflows, plans = {}, {}, {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.endswith("_1.pb"):
                spec = task_pb2.TaskSpec.FromString(data)
                tasks[spec.template.id.name] = spec.template
            elif member.name.endswith("_2.pb"):
                spec = workflow_pb2.WorkflowSpec.FromString(data)
                workflows[spec.template.id.name] = spec.template
            elif member.name.endswith("_3.pb"):
                plan = launch_plan_pb2.LaunchPlan.FromString(data)
                plans[plan.id.name] = plan
    assert {"workflows.finetune.finetune", "workflows.sharded.sharded_data",
            "workflows.sharded.sharded_tokenize", "workflows.sweep.sweep"} <= set(workflows)
    assert {"workflows.sweep.train_trials", "tasks.sweep.resolve_sweep", "tasks.sweep.pick_trial"} <= set(tasks)
    assert {"nightly_retrain", "retrain_on_new_data"} <= set(plans)
    assert plans["nightly_retrain"].spec.entity_metadata.schedule.cron_schedule.schedule == "0 2 * * *"
    assert "config" in plans["nightly_retrain"].spec.fixed_inputs.literals
    train = tasks["tasks.train.train_model"]
    assert train.container.image == policy.TRAIN_IMAGE  # the policy's image, not the package default
    assert train.extended_resources.gpu_accelerator.device == "nvidia-a10g"
    assert {r.value for r in train.container.resources.requests} >= {"1", "48Gi"}
    assert train.metadata.interruptible is True and train.metadata.retries.retries == policy.RETRIES
    assert tasks["tasks.deploy.deploy_model"].container.image == policy.SERVE_IMAGE
    assert tasks["tasks.data.prepare_data"].container.image == policy.DATA_IMAGE
    elastic = [t for name, t in tasks.items() if name.startswith("tasks.train_elastic.")]
    assert len(elastic) == len(policy.MULTI_GPU_COUNTS)


def _all_tasks() -> dict:
    import importlib

    from flytekit.core.base_task import PythonTask

    found = {}
    for module in ("tasks.resolve", "tasks.data", "tasks.tokenize", "tasks.train", "tasks.train_elastic",
                   "tasks.evaluate", "tasks.merge", "tasks.deploy", "tasks.register"):
        for name, value in vars(importlib.import_module(module)).items():
            if isinstance(value, PythonTask) and value.name.startswith(module):
                found[value.name] = value
    return found


def test_no_task_takes_config_text_or_returns_json_text():
    """The stages' contracts are typed (qloraflow/stages.py): no YAML config, no JSON results, no hand-made keys."""
    import dataclasses

    tasks = _all_tasks()
    assert len(tasks) >= 16
    for name, t in tasks.items():
        inputs, outputs = t.python_interface.inputs, t.python_interface.outputs
        assert not {"config_yaml", "pipeline_run_id"} & set(inputs), name
        assert not [i for i in inputs if i.endswith("_key")], name
        # the only text inputs are shard names, which a plan task made
        assert [i for i, tp in inputs.items() if tp is str] in ([], ["shard"]), (name, inputs)
        text_out = [o for o, tp in outputs.items() if tp is str]
        assert text_out == (["o0"] if name == "tasks.register.register_and_promote" else []), (name, outputs)
        if name != "tasks.resolve.resolve_config":
            typed = [i for i, tp in inputs.items() if dataclasses.is_dataclass(tp)]
            assert "settings" in typed or name.endswith("register_and_promote"), (name, inputs)
        # what only spreads the work or names the MLflow run is never in a cache key
        if t.metadata.cache:
            assert {"execution", "context"} & set(inputs) <= set(t.metadata.cache_ignore_input_vars), name
