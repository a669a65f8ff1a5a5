"""Launch-time checks of what a valid config points at: files that exist, weights that are whole.

``qloraflow.config`` checks the config's own values; this checks the files they name, so that a
misspelled path or a truncated model fails at launch with the key at fault, not stages later with a
library's error that names neither. ``qloraflow validate`` and the pipeline's first task run it::

    from qloraflow.preflight import check_launch
    check_launch(load_config("configs/tiny.yaml"), "configs/tiny.yaml")   # ConfigError listing every problem

Checked: every local ``data.train_files`` / ``data.test_files`` entry exists and is not UTF-16/32;
``model.base_model``, when it is a path (see :func:`is_local_path`), is a folder whose safetensors
files are complete (each header against the file's size, every shard of the index present);
``lora.init_adapter`` likewise; ``eval.sqlite_db`` exists and is SQLite (or a folder holding some).
Hub ids cannot be checked offline and are left to the download.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Optional

from qloraflow.config import FinetuneConfig
from qloraflow.errors import ConfigError
from qloraflow.readers import FILE_KINDS, HUB_PREFIX, encoding_problem

# huggingface_hub's repo id: one or two names of letters, digits, '-', '_' and '.', at most 96 characters.
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def is_local_path(value: str) -> bool:
    """Whether ``model.base_model`` means a folder on this machine rather than a Hub id.

    It does when it exists, starts with ``.``, ``/`` or ``~``, cannot be a Hub id (``org/name``: two
    slashes, ``..``, characters a repo name cannot have), or is ``dir/name`` where ``dir`` is a folder
    here (``outputs/my-modle``: a typo of a local model, not an organisation on the Hub).
    """
    if Path(value).expanduser().exists() or value.startswith((".", os.sep, "~")):
        return True
    if not _HUB_ID.match(value) or ".." in value or "--" in value or len(value) > 96:
        return True  # no Hub id looks like this
    return "/" in value and Path(value.split("/", 1)[0]).is_dir()


def safetensors_problem(path: Path) -> Optional[str]:
    """None when a ``.safetensors`` file is readable and as long as its header says, else what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path} is cut short: its header alone says {n} bytes, the file has {size}"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path} cannot be read ({e.strerror})"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path} is not a safetensors file (its header is not JSON)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return (f"{path} is {size} bytes but its header describes {8 + n + end}: the file is incomplete "
                "(an interrupted download or copy); fetch it again")
    return None


def model_problems(key: str, folder: Path) -> list[str]:
    """Problems of a local model or adapter folder: missing, or weights that are incomplete."""
    if not folder.is_dir():
        return [f"'{key}': no folder {folder} (relative paths are read from {Path.cwd()}); a Hub id has the form "
                "org/name"]
    problems = []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            problems.append(f"'{key}': {index.name} lists {', '.join(missing[:3])}, missing from {folder}")
    weights = sorted(folder.glob("*.safetensors"))
    problems += [f"'{key}': {p}" for p in map(safetensors_problem, weights) if p]
    if not weights and not any(folder.glob("*.bin")) and not any(folder.glob("*.gguf")):
        problems.append(f"'{key}': {folder} holds no weights (*.safetensors)")
    return problems


def data_problems(key: str, specs: list[str]) -> list[str]:
    """Inputs that do not exist, and files in an encoding other than UTF-8."""
    problems = []
    for i, spec in enumerate(specs):
        if spec.startswith(HUB_PREFIX):
            continue
        path = Path(spec)
        if not path.exists():
            problems.append(f"'{key}'[{i}]: {spec} not found (relative paths are read from {Path.cwd()})")
            continue
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if FILE_KINDS.get(f.suffix.lower()) in ("jsonl", "json", "csv"):
                problem = encoding_problem(f)
                if problem:
                    problems.append(f"'{key}'[{i}]: {problem}")
    return problems


def sqlite_problems(db: str) -> list[str]:
    path = Path(db)
    if not path.exists():
        return [f"'eval.sqlite_db': {db} not found (relative paths are read from {Path.cwd()}); give a SQLite file "
                "or a folder of <db_id>.sqlite files"]
    if path.is_dir():
        return [] if any(path.glob("*.sqlite")) else [f"'eval.sqlite_db': folder {db} holds no .sqlite file"]
    with open(path, "rb") as f:
        if f.read(16) != _SQLITE_MAGIC:
            return [f"'eval.sqlite_db': {db} is not a SQLite database"]
    return []


def launch_problems(cfg: FinetuneConfig) -> list[str]:
    """Every problem with the files a config names, one line each, each naming its key."""
    problems = data_problems("data.train_files", cfg.data.train_files)
    problems += data_problems("data.test_files", cfg.data.test_files)
    if cfg.model.base_model and is_local_path(cfg.model.base_model):
        problems += model_problems("model.base_model", Path(cfg.model.base_model).expanduser())
    if cfg.lora.init_adapter:
        problems += model_problems("lora.init_adapter", Path(cfg.lora.init_adapter).expanduser())
    if cfg.eval.sqlite_db:
        problems += sqlite_problems(cfg.eval.sqlite_db)
    return problems


def check_launch(cfg: FinetuneConfig, source: str) -> None:
    """Raise one :class:`ConfigError` listing every problem of :func:`launch_problems`."""
    problems = launch_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
