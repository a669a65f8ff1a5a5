"""The export stage: GGUF files of a model that answers the demo's task, run under llama.cpp and checked.

The llama.cpp tests need the export environment (``make setup-export``: llama_cpp built once from the
pinned sdist; ``make test`` builds it) and are skipped with that reason where it is absent. The negative
controls break a good export on purpose with gguf-py's own metadata tool (template removed, template
changed, stop token moved) and see the check fail with the reason.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qloraflow.config import load_config
from qloraflow.errors import ConfigError, ExportError

ROOT = Path(__file__).resolve().parent.parent
EXPORT_PYTHON = str(ROOT / ".venv-export" / "bin" / "python")


def _has_llama_cpp() -> bool:
    if not Path(EXPORT_PYTHON).exists():
        return False
    return subprocess.run([EXPORT_PYTHON, "-c", "import llama_cpp"], capture_output=True).returncode == 0


needs_llama_cpp = pytest.mark.skipif(not _has_llama_cpp(), reason="no llama_cpp in .venv-export: `make setup-export`")


def test_export_config_problems_are_collected_and_named():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny.yaml", {"export": {"gguf": ["q8_0", "q9", "q8_0"],
                                                                "min_agreement": {"f16": 1.5}, "probe_samples": 0}})
    text = str(err.value)
    for expected in ("'export.gguf' has 'q9'", "lists a type twice", "'export.min_agreement' names 'f16'",
                     "'export.min_agreement.f16' must be between 0 and 1", "'export.probe_samples'"):
        assert expected in text
    assert load_config(ROOT / "configs" / "tiny.yaml").export.gguf == []  # off by default: make demo is unchanged


def test_ollama_template_renders_like_the_chat_template(tiny_tokenizer, tmp_path):
    from qloraflow.export import OLLAMA_TEMPLATES, ollama_template, write_modelfile

    chats = [[{"role": "user", "content": "which products cost less than 5 dollars?"}],
             [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "count customers"}]]
    template, system = ollama_template(tiny_tokenizer, chats)
    assert template == OLLAMA_TEMPLATES["chatml"][0] and system == ""
    path = write_modelfile(tmp_path, "model-q8_0.gguf", ["<|im_end|>"], template, system, {}, 512)
    text = path.read_text()
    assert path.name == "Modelfile-q8_0" and "FROM ./model-q8_0.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    # A template of another format is not claimed to be ChatML: the Modelfile then keeps the GGUF's own.
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    assert ollama_template(other, chats) == (None, "")


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory, small_demo):
    """The demo's tiny Llama, fine-tuned until its answers end at ``<|im_end|>`` (see tests/export_model.py)."""
    from export_model import SMALL_SHAPE, train_stopping_model

    return train_stopping_model(small_demo, tmp_path_factory.mktemp("stopping") / "merged_model", steps=300,
                                shape=SMALL_SHAPE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stopping_model, small_demo):
    from qloraflow.export import export_gguf
    from export_model import conversations

    out = tmp_path_factory.mktemp("export")
    chats = conversations(small_demo / "data" / "test.jsonl", 16)
    report = export_gguf(stopping_model, out, ["q8_0", "q4_k_m"], chats, python=EXPORT_PYTHON, max_new_tokens=48)
    return out, report, chats


@pytest.mark.slow
@needs_llama_cpp
def test_gguf_exports_reproduce_the_model_and_stop(exported):
    from qloraflow.export_gguf import read_metadata

    out, report, _ = exported
    q8, q4 = report["gguf"]["q8_0"], report["gguf"]["q4_k_m"]
    assert report["reference_stopped"] == report["prompts"] == 16  # the model under test does stop
    assert q8["agreement"] >= 0.95 and q8["stopped"] == 16 and q8["eos_token"] == "<|im_end|>"
    assert q4["agreement"] >= q4["min_agreement"]
    # every q4 answer that followed the merged model's stops where it stops; one that diverged earlier
    # (4-bit weights on a 64-wide test model) may run on, and is counted against the agreement instead
    diverged = {r["prompt"] for r in q4["per_prompt"] if not r["same"]}
    assert q4["stopped"] + len(q4["ran_on_after_diverging"]) == 16 and set(q4["ran_on_after_diverging"]) <= diverged
    assert "Q8_0" in q8["tensor_types"] and q4["bytes"] < q8["bytes"]
    meta = read_metadata(out / "model-q8_0.gguf")
    assert "<|im_start|>" in meta["tokenizer.chat_template"] and meta["tokenizer.ggml.eos_token_id"] == 2
    modelfile = (out / "Modelfile-q4_k_m").read_text()
    assert "FROM ./model-q4_k_m.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """' in modelfile and not (out / ".model-f16.gguf").exists()


def _edited(src: Path, dst: Path, *args: str) -> Path:
    """A copy of a GGUF with its metadata changed by gguf-py's gguf_new_metadata (from the pinned sdist)."""
    from qloraflow.export_gguf import converter_dir

    env = {**os.environ, "PYTHONPATH": str(converter_dir() / "gguf-py")}
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), "--force", *args],
                   check=True, capture_output=True, env=env)
    return dst


def _check(path: Path, exported, stopping_model):  # noqa: ANN001, ANN202
    from qloraflow.export import _load_reference, check_gguf, reference_answers, stop_ids

    _, _, chats = exported
    model, tokenizer = _load_reference(stopping_model)
    reference = reference_answers(model, tokenizer, chats[:4], 48)
    return check_gguf(path, "q8_0", reference, chats[:4], tokenizer, stop_ids(model, tokenizer), EXPORT_PYTHON, 48)


@pytest.mark.slow
@needs_llama_cpp
def test_negative_control_template_removed_fails(tmp_path, exported, stopping_model):
    out, _, _ = exported
    assert _check(out / "model-q8_0.gguf", exported, stopping_model)["agreement"] >= 0.95  # the intact file passes
    broken = _edited(out / "model-q8_0.gguf", tmp_path / "model-q8_0.gguf", "--remove-metadata", "tokenizer.chat_template")
    with pytest.raises(ExportError, match="has no tokenizer.chat_template"):
        _check(broken, exported, stopping_model)


@pytest.mark.slow
@needs_llama_cpp
def test_negative_control_template_that_renders_differently_fails(tmp_path, exported, stopping_model):
    out, _, _ = exported
    other = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ': ' + message['content'] + "
             "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    broken = _edited(out / "model-q8_0.gguf", tmp_path / "model-q8_0.gguf", "--chat-template", other)
    with pytest.raises(ExportError) as err:
        _check(broken, exported, stopping_model)
    assert "differs from the merged tokenizer's" in str(err.value) and "renders 4 of 4 prompts differently" in str(err.value)


@pytest.mark.slow
@needs_llama_cpp
def test_negative_control_stop_token_moved_fails(tmp_path, exported, stopping_model):
    out, _, _ = exported
    # eos moved to <|pad|> (id 3), a token the model never emits: no answer ends, and the id is not the model's.
    broken = _edited(out / "model-q8_0.gguf", tmp_path / "model-q8_0.gguf", "--special-token-by-id", "eos", "3")
    with pytest.raises(ExportError) as err:
        _check(broken, exported, stopping_model)
    assert "eos token id is 3, not one of the merged model's stop ids [2]" in str(err.value)


MLX_PYTHON = str(ROOT / ".venv-mlx" / "bin" / "python")


@pytest.mark.slow
@pytest.mark.skipif(not Path(MLX_PYTHON).exists(), reason="no .venv-mlx (mlx[cpu]==0.32.4 and mlx-lm)")
def test_mlx_export_loads_and_answers(tmp_path, stopping_model, small_demo):
    from qloraflow.export import _load_reference, check_mlx, reference_answers
    from export_model import conversations

    chats = conversations(small_demo / "data" / "test.jsonl", 4)
    model, tokenizer = _load_reference(stopping_model)
    reference = reference_answers(model, tokenizer, chats, 48)
    report = check_mlx(stopping_model, tmp_path / "mlx", reference, chats, MLX_PYTHON, 48, quantize=False)
    assert report["answered"] == 4 and (tmp_path / "mlx" / "config.json").exists()
    # Negative control: a folder whose chat template renders otherwise is refused with the prompt named.
    (tmp_path / "mlx" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    from qloraflow.export_mlx import answer_mlx

    answers = answer_mlx(tmp_path / "mlx", chats[:1], 4, MLX_PYTHON)
    assert answers[0]["rendered"] != reference[0]["rendered"]
