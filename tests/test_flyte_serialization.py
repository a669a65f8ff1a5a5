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
    assert set(t.metadata.cache_ignore_input_vars) == {"config_yaml", "pipeline_run_id"}
    versions = [policy.code_version(s) for s in policy.ORDER]
    assert len(set(versions)) == len(versions)  # each stage has its own version
    assert serialize(register_and_promote).template.metadata.discoverable is False  # the gate always runs


def test_workflow_and_schedules_serialize():
    wf = serialize(finetune)
    nodes = {n.id: n for n in wf.template.nodes}
    assert len(nodes) == 8
    for lp, cron in ((nightly_retrain, "0 2 * * *"), (retrain_on_new_data, "0 * * * *")):
        spec = serialize(lp)
        assert spec.spec.entity_metadata.schedule.cron_schedule.schedule == cron
        assert "config" in spec.spec.fixed_inputs.literals
