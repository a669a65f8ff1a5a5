"""Files the pipeline writes: atomically, with digests, under locks. One implementation for every stage.

A stage that is killed must never leave a half-written file under its final name, and two pipelines
running at once must never interleave a read-modify-write of one file. Three mechanisms cover that:

- :func:`write_atomic`: fill a temporary sibling, then ``os.replace`` it over the final name (atomic
  within one filesystem); the temporary is removed if writing fails::

      write_atomic(out / "report.json", json.dumps(report))            # text
      write_atomic(out / "train.parquet", lambda tmp: table.to_parquet(tmp))   # a writer of its own

- :func:`sha256_file`: a file's sha256, read in blocks (a 16 GB model shard never sits in memory);
- :func:`file_lock`: an exclusive ``flock`` held for the ``with`` block.

Folders (checkpoints, adapters, merged models) are published the same way by
``qloraflow.checkpoint.save_atomic``: written in a temporary sibling with a manifest of these digests
last, then renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def write_atomic(path: PathLike, content: Union[str, bytes, Callable[[Path], Any]]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes the path it is given) to ``path`` atomically.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "a.txt"
    >>> write_atomic(p, "hello").read_text()
    'hello'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sha256_file(path: PathLike) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``flock`` locks are released by the kernel when the process dies, so a killed holder never
    leaves the lock taken.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
