"""Stage settings (qloraflow/stages.py, built in tasks/resolve.py): each stage's settings, its cache key,
follow exactly the inputs that decide its result."""

from __future__ import annotations

import shutil

from conftest import tiny_config
from qloraflow.stages import ExecutionSettings, StageSettings, stage_settings
from tasks.resolve import input_fingerprints


def settings_for(model_dir, data_file, **overrides) -> StageSettings:
    cfg = tiny_config(model_dir, **{"data.train_files": [str(data_file)], **overrides})
    return stage_settings(cfg, input_fingerprints(cfg))


def test_the_data_settings_follow_the_tokenizer_only_when_the_data_stage_counts_tokens(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    before = {"plain": settings_for(model, data), "max_tokens": settings_for(model, data, **{"data.max_tokens": 64})}
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + "{# edited #}")
    after = {"plain": settings_for(model, data), "max_tokens": settings_for(model, data, **{"data.max_tokens": 64})}
    for case in before:
        assert after[case].tokenize != before[case].tokenize
        assert after[case].evaluate == before[case].evaluate
    assert after["plain"].data == before["plain"].data  # no tokenizer in the data stage
    assert after["max_tokens"].data != before["max_tokens"].data  # token counts may now differ
    data.write_text('{"instruction": "Say hello", "output": "hello"}\n')  # same path, other content
    assert settings_for(model, data).data != after["plain"].data


def test_execution_only_settings_reach_no_stage_settings(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    base = settings_for(tiny_model_dir, data)
    spread = settings_for(tiny_model_dir, data, **{"data.dedupe_workers": 3, "data.num_shards": 4,
                                                   "tokenize.num_proc": 2, "tokenize.num_shards": 2,
                                                   "train.distributed": "fsdp"})
    assert spread.execution == ExecutionSettings(data_dedupe_workers=3, data_num_shards=4, tokenize_num_proc=2,
                                                 tokenize_num_shards=2, train_distributed="fsdp")
    for stage in ("data", "tokenize", "train", "evaluate", "merge", "deploy"):
        assert getattr(spread, stage) == getattr(base, stage), stage
    # ... and the task gets them back where the library reads them
    assert spread.execution.apply("data", spread.data.data).dedupe_workers == 3
    assert spread.train.config(spread.execution).train.distributed == "fsdp"


def test_execution_settings_are_exactly_the_config_execution_only_fields():
    import dataclasses

    from qloraflow.config import FinetuneConfig

    cfg = FinetuneConfig()
    marked = {f"{section.name}_{f.name}" for section in dataclasses.fields(cfg)
              if dataclasses.is_dataclass(getattr(cfg, section.name))
              for f in dataclasses.fields(getattr(cfg, section.name)) if f.metadata.get("execution_only")}
    assert {f.name for f in dataclasses.fields(ExecutionSettings)} == marked


def test_a_setting_that_changes_a_result_changes_the_stages_it_reaches(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    base = settings_for(tiny_model_dir, data)
    lr = settings_for(tiny_model_dir, data, **{"train.learning_rate": 3e-4})
    assert (lr.data, lr.tokenize) == (base.data, base.tokenize) and lr.train != base.train
    kl = settings_for(tiny_model_dir, data, **{"merge.kl_factor": 9.5})
    assert (kl.train, kl.evaluate) == (base.train, base.evaluate) and kl.merge != base.merge
