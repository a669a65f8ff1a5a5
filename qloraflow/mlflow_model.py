"""The merged model as an MLflow Model: the transformers flavor, a chat signature, and a logged model to register.

The register task logs the merged folder once, as MLflow's own model format, into the pipeline run;
the registry version then points at that logged model (``models:/m-...``), so MLflow lists it on the
experiment's Models tab, with its signature, and loads it back with its own loaders::

    model_id, uri = log_merged_model(client, pipeline_run_id, "outputs/.../merged_model", card_text)
    register_once(client, "tiny-sql", digest, uri, pipeline_run_id, tags, model_id=model_id)

    chat = mlflow.pyfunc.load_model("models:/tiny-sql@champion")
    chat.predict({"messages": [{"role": "user", "content": "How many orders ...?"}], "max_tokens": 64})

The model is logged from its folder (no weights are loaded: an 8B model costs a file copy, not 16 GB of
memory), with MLflow's ``llm/v1/chat`` task, so the pyfunc applies the model's chat template and answers
in the OpenAI chat format, as vLLM does. The checkpoint lands whole (weights, config, tokenizer, chat
template) under ``<model>/model``: :func:`hf_folder` finds it in a downloaded version.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional

ARTIFACT_NAME = "merged_model"
TASK = "llm/v1/chat"
# Where the transformers flavor keeps a checkpoint logged from a folder (mlflow.transformers.model_io).
CHECKPOINT_SUBDIR = "model"


@contextlib.contextmanager
def global_store(client: Any) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``client``'s while inside, then put back.

    ``mlflow.transformers.log_model`` and the registry's resolution of a ``models:/m-...`` source (MLflow's
    SQL store calls ``MlflowClient()``) read the global URI, not the client's: without this they write to,
    or look in, ``./mlflow.db``.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _pipeline_classes_for_mlflow() -> Iterator[None]:
    """transformers 5 names a task's pipeline class by its dotted path; MLflow 3.17 reads ``impl.__name__``.

    ``mlflow.transformers`` logging a model from a folder calls ``transformers.pipelines.check_task`` and
    takes ``task_metadata["impl"].__name__`` (mlflow/transformers/flavor_config.py:213), which fails on
    transformers >= 5 (``'str' object has no attribute '__name__'``). For the duration of the call the
    class is imported from that path, so MLflow records the same name (``TextGenerationPipeline``) it
    records for a transformers 4 pipeline. A transformers that returns the class is left as it is.
    """
    import transformers.pipelines as pipelines

    original = pipelines.check_task

    def check_task(task: str) -> Any:
        name, meta, options = original(task)
        impl = meta.get("impl")
        if isinstance(impl, str):
            module, _, cls = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def log_merged_model(client: Any, run_id: str, folder: str | os.PathLike, card: str,
                     tags: Optional[dict[str, Any]] = None) -> tuple[str, str]:
    """Log the merged model folder into ``run_id`` as an MLflow Model (transformers flavor, chat signature).

    Args:
        client: ``MlflowClient`` of the pipeline's tracking store.
        run_id: the pipeline run that owns the model (its experiment holds the logged model).
        folder: the merged model (``config.json``, safetensors, tokenizer and its chat template).
        card: the model card (markdown) stored with the model.
        tags: tags of the logged model (shown on the Models tab).

    Returns:
        ``(model_id, model_uri)``: the logged model's id and its ``models:/m-...`` URI, to register.

    Raises:
        FileNotFoundError: ``folder`` has no ``config.json`` (not a transformers checkpoint).
    """
    import mlflow
    from huggingface_hub import ModelCard

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; log_merged_model needs the merge stage's output folder")
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=ARTIFACT_NAME, source_run_id=run_id,
                                       tags={k: str(v) for k, v in (tags or {}).items()})
    with global_store(client), _pipeline_classes_for_mlflow():
        info = mlflow.transformers.log_model(
            str(folder), task=TASK, name=ARTIFACT_NAME, run_id=run_id, model_id=model.model_id,
            # "license: other" marks the card as carrying no Hub license, so MLflow asks no Hub for one.
            model_card=ModelCard(f"---\nlicense: other\n---\n{card}"), pip_requirements=_requirements())
    return info.model_id, f"models:/{info.model_id}"


def _requirements() -> list[str]:
    """The environment the model loads in: this process's transformers, torch, accelerate (no local +cpu tag)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in ("transformers", "torch", "accelerate") if _installed(p)]


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


def hf_folder(local: str | os.PathLike) -> Path:
    """The transformers checkpoint inside a downloaded version: ``<local>/model`` of an MLflow Model, else ``local``.

    Versions registered before the model was logged as an MLflow Model are bare folders of files.
    """
    local = Path(local)
    return local / CHECKPOINT_SUBDIR if (local / "MLmodel").is_file() else local


def download_version(client: Any, source: str, dst: Optional[str | os.PathLike] = None) -> Path:
    """Download a registered version (its ``source``, or any ``models:/`` URI) and return its checkpoint folder.

    A ``models:/m-...`` source resolves through MLflow's process-wide store, so the download runs
    inside :func:`global_store`; the folder returned is :func:`hf_folder` of what came down.
    """
    import mlflow

    with global_store(client):
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=client.tracking_uri,
                                                    dst_path=None if dst is None else str(dst))
    return hf_folder(local)
