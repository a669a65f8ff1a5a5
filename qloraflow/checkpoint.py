"""Checkpoints that are trusted only when complete.

A checkpoint is written into a staging folder (``.staging/checkpoint-N``), gets ``manifest.json`` (the
sha256 of every file in it) last, and only then is renamed next to the others: a process killed while
writing one leaves only the staging folder, which ``discard_staging`` removes on resume. A folder that
still fails its manifest (a disk error, a copy cut short by the checkpoint store) is skipped by
``latest_complete`` with a warning and moved aside (never deleted), so the trainer cannot rotate or
overwrite it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from qloraflow.files import replace_folder, sha256_file

MANIFEST = "manifest.json"
STAGING = ".staging"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike, meta: Optional[dict[str, Any]] = None) -> Path:
    """Hash every file of ``folder`` and write the manifest last, atomically."""
    folder = Path(folder)
    manifest = {"files": {str(p.relative_to(folder)): sha256_file(p) for p in _files(folder)},
                "written_at": time.time(), **(meta or {})}
    tmp = folder / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def verify(folder: str | os.PathLike) -> Optional[str]:
    """None when the folder matches its manifest, else the reason it does not."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (written last): the checkpoint was not finished"
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable manifest: {e}"
    for rel, digest in manifest.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its hash"
    return None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def latest_complete(root: str | os.PathLike) -> Optional[Path]:
    """The newest ``checkpoint-N`` under ``root`` that matches its manifest; set aside the broken ones."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()),
                   reverse=True)
    for step, path in found:
        problem = verify(path)
        if problem is None:
            return path
        aside = root / f"incomplete-{path.name}-{int(time.time())}"
        warnings.warn(f"skipping checkpoint {path}: {problem}; moved to {aside.name}", stacklevel=2)
        print(f"[qloraflow] skipping checkpoint {path}: {problem}; moved to {aside.name}", flush=True)
        os.replace(path, aside)
    return None


def newest_size(root: str | os.PathLike) -> Optional[int]:
    """Bytes of the newest ``checkpoint-N`` under ``root`` (what the next one will about take), None if none."""
    root = Path(root)
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))) if root.is_dir() else []
    return sum(f.stat().st_size for f in found[-1][1].rglob("*") if f.is_file()) if found else None


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a finished folder into place; an existing folder of that name is replaced whole."""
    return replace_folder(staged, final)


def discard_staging(root: str | os.PathLike) -> None:
    """Remove what a killed save left in the staging folder: it never became a checkpoint."""
    staging = Path(root) / STAGING
    if staging.exists():
        left = sorted(p.name for p in staging.iterdir())
        print(f"[qloraflow] discarding unfinished checkpoint save(s) {left} in {staging}", flush=True)
        shutil.rmtree(staging, ignore_errors=True)


def save_atomic(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Let ``write`` fill a temporary sibling folder, add a manifest, then rename it into place."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    write_manifest(tmp)
    return publish(tmp, final)
