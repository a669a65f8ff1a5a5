"""Launch-time checks: bad paths, truncated weights, YAML strings that look like numbers, list-shaped
configs and UTF-16 files are caught by ``qloraflow validate`` and the first task, each naming its key."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_config
from qloraflow.config import DataConfig, load_config
from qloraflow.data import prepare_dataset
from qloraflow.errors import ConfigError, DataValidationError
from qloraflow.preflight import is_local_path, launch_problems

QLORAFLOW = Path(sys.executable).parent / "qloraflow"
ALPACA = '{"instruction": "Count the customers.", "output": "SELECT COUNT(*) FROM customers;"}\n'


def validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(QLORAFLOW), "validate", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def inputs(tmp_path, tiny_model_dir):
    """A config whose every file exists: data, a copy of the tiny model, a SQLite database."""
    (tmp_path / "train.jsonl").write_text(ALPACA)
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    sqlite3.connect(tmp_path / "shop.sqlite").execute("CREATE TABLE customers (id INTEGER)").connection.close()
    raw = tiny_config(model, **{"data.train_files": [str(tmp_path / "train.jsonl")],
                                "eval.metrics": ["execution_accuracy"], "eval.gate_metric": "execution_accuracy",
                                "eval.sqlite_db": str(tmp_path / "shop.sqlite")}).to_dict()
    return tmp_path, model, raw


def test_missing_paths_each_name_their_key_at_validate(inputs):
    tmp, model, raw = inputs
    good = write_config(tmp / "good.yaml", raw)
    assert launch_problems(load_config(good)) == []  # negative control: every file there
    bad = dict(raw, data={**raw["data"], "train_files": [str(tmp / "trian.jsonl")]},
               model={**raw["model"], "base_model": str(tmp / "models" / "tiyn")},
               eval={**raw["eval"], "sqlite_db": str(tmp / "shop.sqlit")})
    proc = validate(str(write_config(tmp / "bad.yaml", bad)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr
    assert "3 config problem(s)" in err
    assert f"'data.train_files'[0]: {tmp / 'trian.jsonl'} not found" in err
    assert f"'model.base_model': no folder {tmp / 'models' / 'tiyn'}" in err  # not taken for a Hub id
    assert f"'eval.sqlite_db': {tmp / 'shop.sqlit'} not found" in err
    assert validate("--config-only", str(tmp / "bad.yaml")).returncode == 0  # the values alone are fine


def test_a_path_like_base_model_is_local_and_a_hub_id_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for local in ("./model", "/abs/model", "~/model", "build/demo/base-model", "outputs/my-modle", "a/../b"):
        assert is_local_path(local), local
    for hub in ("HuggingFaceTB/SmolLM2-135M", "gpt2", "meta-llama/Meta-Llama-3-8B"):
        assert not is_local_path(hub), hub


def test_truncated_safetensors_is_named_at_validate_not_in_training(inputs):
    tmp, model, raw = inputs
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    proc = validate(str(write_config(tmp / "cfg.yaml", raw)))
    assert proc.returncode == 2, proc.stderr
    assert (f"'model.base_model': {weights} is {len(data) // 2} bytes but its header describes {len(data)}: "
            "the file is incomplete") in proc.stderr
    weights.write_bytes(data[:4])
    assert "too short for a safetensors header" in "\n".join(launch_problems(load_config(tmp / "cfg.yaml")))


def test_the_first_task_runs_the_same_checks(inputs):
    from flytekit.types.file import FlyteFile

    from tasks.resolve import resolve_config

    tmp, model, raw = inputs
    raw["eval"]["sqlite_db"] = str(tmp / "missing.sqlite")
    raw["tracking"]["tracking_uri"] = f"sqlite:///{tmp}/mlflow.db"
    with pytest.raises(Exception, match=r"'eval.sqlite_db': .*missing.sqlite not found") as e:
        resolve_config(config=FlyteFile(str(write_config(tmp / "cfg.yaml", raw))))
    assert "data.train_files" not in str(e.value)  # the database's own key, not the data's
    assert not (tmp / "mlflow.db").exists()  # refused before any MLflow run was opened


def test_numbers_yaml_reads_as_strings_get_the_fix(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {base_model: m}\ndata: {train_files: [a.jsonl]}\n"
                    "train: {learning_rate: 2e-4, max_steps: 1e3, weight_decay: 1.5e2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert ("'train.learning_rate' must be float, got '2e-4': YAML reads 2e-4 as a string, not a number "
            "(a YAML float needs a dot and a signed exponent); write 2.0e-4") in msg
    assert "'train.weight_decay' must be float, got '1.5e2': YAML reads 1.5e2 as a string" in msg
    assert "write 1.5e+2" in msg
    assert "'train.max_steps' must be int, got '1e3': YAML reads 1e3 as a string, not a number; write 1000" in msg
    path.write_text(path.read_text().replace("2e-4", "2.0e-4").replace("1e3", "1000").replace("1.5e2", "1.5e+2"))
    assert load_config(path).train.learning_rate == 2e-4  # the fix it gives is read as a float


def test_set_on_a_list_shaped_config_is_a_clear_error(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model: {base_model: m}\n- data: {train_files: [a.jsonl]}\n")
    proc = validate(str(listed), "--set", "train.max_steps=5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the top level must be a mapping of sections (data:, model:, ...), got a list" in proc.stderr
    section = tmp_path / "section.yaml"
    section.write_text("model: {base_model: m}\ndata: {train_files: [a.jsonl]}\ntrain: [max_steps, 5]\n")
    with pytest.raises(ConfigError, match=r"override train.max_steps=5: 'train' is a list in the file"):
        load_config(section, {"train.max_steps": 5})
    proc = validate(str(section), "--config-only", "--set", "max_steps")
    assert proc.returncode == 2 and "--set 'max_steps': write KEY=VALUE" in proc.stderr, proc.stderr


def test_a_utf16_file_is_named_with_the_fix_not_quarantined_as_json(tmp_path):
    good, wide = tmp_path / "good.jsonl", tmp_path / "wide.jsonl"
    good.write_text(ALPACA * 3)
    wide.write_bytes((ALPACA * 3).encode("utf-16"))  # what Windows tools save as "Unicode"
    assert launch_problems(load_config(write_config(tmp_path / "c.yaml", {
        "model": {"base_model": "gpt2"}, "data": {"train_files": [str(good)]}}))) == []
    problems = launch_problems(load_config(write_config(tmp_path / "c.yaml", {
        "model": {"base_model": "gpt2"}, "data": {"train_files": [str(good), str(wide)]}})))
    assert problems == [f"'data.train_files'[1]: file {wide} is UTF-16; convert it to UTF-8 "
                        f"(iconv -f UTF-16 -t UTF-8 {wide} > {tmp_path / 'wide.utf8.jsonl'})"]
    with pytest.raises(DataValidationError, match=rf"file {wide} is UTF-16; convert it to UTF-8"):
        prepare_dataset(DataConfig(train_files=[str(wide)]), tmp_path / "out")
    wide.write_bytes((ALPACA * 3).encode("utf-16-be"))  # no byte order mark at all
    assert "is UTF-16" in launch_problems(load_config(tmp_path / "c.yaml"))[0]
    assert json.loads(ALPACA)  # the same text in UTF-8 is a valid record
