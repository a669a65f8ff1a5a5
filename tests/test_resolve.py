"""Cache keys (tasks/resolve.py): each stage's key follows exactly the inputs that decide its result."""

from __future__ import annotations

import shutil

from conftest import tiny_config
from tasks.resolve import input_fingerprints, stage_keys


def keys_for(model_dir, data_file, **overrides) -> dict[str, str]:
    cfg = tiny_config(model_dir, **{"data.train_files": [str(data_file)], **overrides})
    return stage_keys(cfg, input_fingerprints(cfg))


def test_the_data_key_follows_the_tokenizer_only_when_the_data_stage_counts_tokens(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    before = {"plain": keys_for(model, data), "max_tokens": keys_for(model, data, **{"data.max_tokens": 64})}
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + "{# edited #}")
    after = {"plain": keys_for(model, data), "max_tokens": keys_for(model, data, **{"data.max_tokens": 64})}
    for case in before:
        assert after[case]["tokenize_key"] != before[case]["tokenize_key"]
        assert after[case]["eval_key"] == before[case]["eval_key"]
    assert after["plain"]["data_key"] == before["plain"]["data_key"]  # no tokenizer in the data stage
    assert after["max_tokens"]["data_key"] != before["max_tokens"]["data_key"]  # token counts may now differ
    data.write_text('{"instruction": "Say hello", "output": "hello"}\n')  # same path, other content
    assert keys_for(model, data)["data_key"] != after["plain"]["data_key"]
