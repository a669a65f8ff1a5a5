"""The merged model as an MLflow Model: logged with the transformers flavor and a signature, registered, and
loaded back from the registry by MLflow's own loaders, which generate the same answer as the folder did.

Real MLflow (a SQLite store in a temporary folder) and a real transformers model (the demo's tiny Llama).
"""

from __future__ import annotations

import json

import pytest

from qloraflow import registry
from qloraflow.mlflow_model import ARTIFACT_NAME, global_store, hf_folder, log_merged_model

NAME = "tiny-sql-mlflow-model"
QUESTION = [{"role": "user", "content": "How many orders are there?"}]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment("qloraflow-mlflow-model", artifact_location=str(root / "artifacts"))
    return client, exp_id


@pytest.fixture(scope="module")
def champion(store, tiny_model_dir):
    """The tiny model logged into a pipeline run, registered by its logged model, and made champion."""
    client, exp_id = store
    run_id = client.create_run(exp_id, run_name="pipeline").info.run_id
    model_id, uri = log_merged_model(client, run_id, tiny_model_dir, "# tiny-sql\n\nA test card.",
                                     tags={"dataset.hash": "d" * 64})
    version, created = registry.register_once(client, NAME, "a" * 64, uri, run_id, {"dataset.hash": "d" * 64},
                                              model_id=model_id)
    assert created
    registry.set_champion(client, NAME, version)
    client.set_terminated(run_id)
    return {"client": client, "exp_id": exp_id, "run_id": run_id, "model_id": model_id, "version": version}


def _greedy_answer(folder) -> str:  # noqa: ANN001
    """What the model folder itself answers, through transformers (the reference for MLflow's loaders)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return _greedy_answer_of(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


def _greedy_answer_of(model, tok) -> str:  # noqa: ANN001
    import torch

    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_version_is_a_logged_mlflow_model_with_a_signature(champion):
    client = champion["client"]
    mv = client.get_model_version(NAME, champion["version"])
    logged = client.get_logged_model(champion["model_id"])
    assert mv.source in (f"models:/{champion['model_id']}", logged.artifact_location)
    assert str(logged.status).endswith("READY")
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": champion["version"]}]
    assert logged.experiment_id == champion["exp_id"] and logged.source_run_id == champion["run_id"]
    assert logged.name == ARTIFACT_NAME and logged.tags["dataset.hash"] == "d" * 64
    # The experiment's Models tab lists it: the logged models of the experiment.
    assert [m.model_id for m in client.search_logged_models([champion["exp_id"]])] == [champion["model_id"]]
    # The run records it as its output (MLflow's run -> model lineage).
    outputs = client.get_run(champion["run_id"]).outputs.model_outputs
    assert [o.model_id for o in outputs] == [champion["model_id"]]

    from mlflow.models import get_model_info

    with global_store(client):  # MLflow's loaders read the process-wide store
        info = get_model_info(f"models:/{NAME}@champion")
    assert "transformers" in info.flavors and "python_function" in info.flavors
    assert info.flavors["transformers"]["task"] == "text-generation"
    assert info.signature is not None
    inputs = json.loads(info.signature.to_dict()["inputs"])
    assert "messages" in [i["name"] for i in inputs]


def test_the_registered_champion_loads_back_through_mlflow_and_answers(champion, tiny_model_dir):
    import mlflow

    expected = _greedy_answer(tiny_model_dir)
    assert expected.strip(), "the reference answer is empty: the comparison would prove nothing"

    with global_store(champion["client"]):
        chat = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        components = mlflow.transformers.load_model(f"models:/{NAME}@champion", return_type="components")
    reply = chat.predict({"messages": QUESTION, "max_tokens": MAX_NEW_TOKENS})[0]
    assert reply["object"] == "chat.completion"
    # MLflow's chat pyfunc answers (its own generation settings; the text need not equal ours, see the report)
    assert reply["choices"][0]["message"]["content"].strip()
    assert reply["usage"]["completion_tokens"] == MAX_NEW_TOKENS
    # The model and tokenizer MLflow loads from the registry answer exactly as the merged folder does.
    assert _greedy_answer_of(components["model"], components["tokenizer"]) == expected
    assert type(components["model"]).__name__ == "LlamaForCausalLM"
    assert components["tokenizer"].chat_template  # the template travels with the model


def test_a_downloaded_version_holds_the_checkpoint_whole(champion, tiny_model_dir, tmp_path):
    """What vLLM and a re-evaluation read: the weights, config and tokenizer files as the merge wrote them."""
    import mlflow

    with global_store(champion["client"]):  # a models:/ URI resolves through the process-wide registry
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@champion", dst_path=str(tmp_path))
    folder = hf_folder(local)
    assert folder.name == "model" and (folder.parent / "MLmodel").is_file()
    for f in tiny_model_dir.iterdir():
        assert (folder / f.name).read_bytes() == f.read_bytes(), f.name
    assert _greedy_answer(folder) == _greedy_answer(tiny_model_dir)


# ----------------------------------------------------------------------------- negative controls


def test_a_bare_folder_version_is_its_own_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hf_folder(tmp_path) == tmp_path


def test_a_folder_that_is_no_checkpoint_is_refused_with_its_name(store, tmp_path):
    client, exp_id = store
    run_id = client.create_run(exp_id).info.run_id
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no config.json"):
        log_merged_model(client, run_id, tmp_path, "card")
