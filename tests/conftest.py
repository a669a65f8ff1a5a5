"""Shared fixtures: a real MLflow tracking server on 127.0.0.1, tiny models built offline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _outputs_listing() -> list[str]:
    folder = ROOT / "outputs"
    return sorted(p.relative_to(ROOT).as_posix() for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="session", autouse=True)
def checkout_outputs_untouched():
    """Tests write only to temporary folders: the checkout's outputs/ (a user's kept results) ends the
    session exactly as it began (a config's default ``output_dir`` is the relative ``outputs``)."""
    before = _outputs_listing()
    yield
    added = sorted(set(_outputs_listing()) - set(before))
    assert not added, f"tests wrote into {ROOT / 'outputs'} (give them tmp_path): {added[:20]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a SQLite store, on loopback; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 90)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


CORPUS = [
    "Write an SQLite query: how many customers live in Paris?", "SELECT COUNT(*) FROM customers WHERE city = 'Paris';",
    "You are a helpful assistant.", "Translate to French: good morning", "bonjour", "Tell me a joke about cats.",
    "### Instruction:", "### Response:", "<|start_header_id|>user<|end_header_id|>", "<|eot_id|>",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE tokenizer (trained here, offline) with a ChatML template."""
    from qloraflow.demo import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer random Llama (bf16) plus its tokenizer, saved like a Hub model folder."""
    from qloraflow.demo import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_llama(tiny_tokenizer, seed=0, num_hidden_layers=2).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_splits(folder: Path, n_train: int = 48, n_val: int = 8, n_test: int = 8) -> Path:
    """Parquet splits in the data stage's output format: a tiny templated SQL task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cities = ["Paris", "Lyon", "Rome", "Oslo"]

    def rec(i: int) -> dict:
        city = cities[i % len(cities)]
        return {"id": str(i), "source": f"train.jsonl:{i + 1}", "format": "alpaca", "messages": [
            {"role": "user", "content": f"Write an SQLite query: how many customers live in {city}?"},
            {"role": "assistant", "content": f"SELECT COUNT(*) FROM customers WHERE city = '{city}';"}]}

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    start = 0
    for split, n in sizes.items():
        pq.write_table(pa.Table.from_pylist([rec(i) for i in range(start, start + n)]), folder / f"{split}.parquet")
        start += n
    return folder


@pytest.fixture(scope="session")
def tiny_tokenized(tmp_path_factory, tiny_model_dir):
    """A tokenized, packed dataset folder (tokenize stage output) for the tiny model."""
    from qloraflow.config import TokenizeConfig
    from qloraflow.tokenize import tokenize_dataset

    root = tmp_path_factory.mktemp("tokenized")
    data = write_splits(root / "data")
    tokenize_dataset(TokenizeConfig(sequence_len=128, packing=True), data, tiny_model_dir, root / "tok")
    return root / "tok"


def tiny_config(model_dir: Path, **overrides):
    """A config for a few CPU steps of real QLoRA on the tiny model."""
    from qloraflow.config import config_from_dict

    raw = {"name": "t", "seed": 7, "model": {"base_model": str(model_dir), "quantization": "4bit"},
           "data": {"train_files": ["unused.jsonl"]},
           "tokenize": {"sequence_len": 128, "packing": True},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
           "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 6, "learning_rate": 1e-3,
                     "save_steps": 2, "eval_steps": 0, "logging_steps": 1, "use_cpu": True,
                     "gradient_checkpointing": False, "warmup_ratio": 0.0}}
    for dotted, value in overrides.items():
        sec, key = dotted.split(".")
        raw.setdefault(sec, {})[key] = value
    return config_from_dict(raw)


# --- whole-workflow runs: `pyflyte run` on small demo assets, from a snapshot of the project ---------------------


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """Demo assets with 200 train and 16 test records, generated once: copy them before changing any."""
    from qloraflow.demo import generate_demo_assets

    root = tmp_path_factory.mktemp("small-demo")
    generate_demo_assets(root, seed=0, n_train=200, n_test=16)
    return root


def snapshot_project(dest: Path) -> Path:
    """Copy the importable code (library, tasks, workflows): runs from it see one version of the code."""
    import shutil

    for part in ("qloraflow", "tasks", "workflows"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def quick_pipeline_config(demo: Path, output_dir: Path, **dotted) -> dict:
    """configs/tiny.yaml pointed at ``demo``, cut to seconds per stage: 6 steps, 8 test prompts, no serving."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"].update(train_files=[str(demo / "data/train.jsonl")], test_files=[str(demo / "data/test.jsonl")])
    cfg["model"]["base_model"] = str(demo / "base-model")
    cfg["train"].update(max_steps=6, save_steps=3, eval_steps=3, logging_steps=1)
    cfg["eval"].update(sqlite_db=str(demo / "data/shop.sqlite"), max_samples=8, batch_size=8)
    cfg["serve"]["enabled"] = False
    cfg["output_dir"] = str(output_dir)
    for key, value in dotted.items():
        sec, name = key.split(".")
        cfg[sec][name] = value
    return cfg


def pyflyte_env(root: Path, tracking_uri: str) -> dict:
    """Flyte keeps its local cache under $HOME and task outputs under $TMPDIR: both inside ``root``."""
    (root / "home").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, HOME=str(root / "home"), TMPDIR=str(root / "tmp"), MLFLOW_TRACKING_URI=tracking_uri,
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def start_pyflyte(project: Path, config: Path, env: dict, log: Path) -> subprocess.Popen:
    """``pyflyte run workflows/finetune.py finetune --config <config>`` in ``project``, output to ``log``."""
    return subprocess.Popen([str(Path(sys.executable).with_name("pyflyte")), "run", "workflows/finetune.py",
                             "finetune", "--config", str(config)], cwd=project, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finished_pyflyte(proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> tuple[str, dict]:
    """Wait for a pyflyte run; return its output and the summary file of this execution."""
    import json
    import re

    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    return out, json.loads(Path(re.findall(r"^summary\s+(\S+)$", out, re.M)[-1]).read_text())
