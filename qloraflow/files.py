"""Files the pipeline writes: atomically, with digests, under locks. One implementation for every stage.

A stage that is killed must never leave a half-written file under its final name, and two pipelines
running at once must never interleave a read-modify-write of one file. Three mechanisms cover that:

- :func:`write_atomic`: fill a temporary sibling, then ``os.replace`` it over the final name (atomic
  within one filesystem); the temporary is removed if writing fails::

      write_atomic(out / "report.json", json.dumps(report))            # text
      write_atomic(out / "train.parquet", lambda tmp: table.to_parquet(tmp))   # a writer of its own

- :func:`sha256_file`: a file's sha256, read in blocks (a 16 GB model shard never sits in memory);
- :func:`file_lock`: an exclusive ``flock`` held for the ``with`` block.

Folders are published the same way: :func:`atomic_folder` fills a temporary sibling and then
replaces the folder whole (the data stage's outputs: never a new report beside an old run's splits);
``qloraflow.checkpoint.save_atomic`` adds a manifest of these digests last (checkpoints, adapters,
merged models).

A write that runs out of room (a full disk, a quota, a file size limit) raises
:class:`~qloraflow.errors.DiskFullError` naming the file and the space it needs
(:func:`raise_if_out_of_space`), in place of ``OSError [Errno 28]`` without a file name or torch's
``unexpected pos 598784 vs 598672``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import resource
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from qloraflow.errors import DiskFullError

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
    except Exception as e:  # noqa: BLE001 - classified, then raised again
        size = len(content.encode()) if isinstance(content, str) else None if callable(content) else len(content)
        raise_if_out_of_space(e, path, size, written=tmp.stat().st_size if tmp.exists() else 0)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Fill a temporary sibling of ``path`` in the ``with`` block; then it replaces ``path`` whole.

    Whatever ``path`` held before is gone once the block succeeds, and untouched when it fails (the
    temporary folder is removed): a reader sees the old folder or the new one, never a mix.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(staged: PathLike, final: PathLike) -> Path:
    """Rename a finished folder into place; an existing folder of that name is replaced whole."""
    staged, final = Path(staged), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    return final


# ---------------------------------------------------------------------------------------------------
# Out of space

_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was reached",
            errno.EDQUOT: "the disk quota is exceeded"}
# torch's zip writer drops the errno: "unexpected pos N vs M", "PytorchStreamWriter failed writing file".
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed|file write failed")


def out_of_space(e: BaseException) -> Optional[str]:
    """Why a write failed when it ran out of room ("the disk is full", ...), else None.

    Reads the errno of ``e`` or of an exception it was raised from, safetensors' ``(os error 28)``,
    and torch's errno-less zip writer errors (then the size limit and the free space tell which).
    """
    seen = 0
    while e is not None and seen < 5:
        code = getattr(e, "errno", None)
        m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(e)) if code is None else None
        code = int(m.group(1) or m.group(2)) if m else code
        if code in _NO_ROOM:
            return _NO_ROOM[code]
        if _TORCH_WRITE_FAILED.search(str(e)):
            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
            if soft != resource.RLIM_INFINITY:
                return f"the file size limit was reached (RLIMIT_FSIZE {soft} bytes)"
            return "the disk is full (or another write error: torch does not say which)"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def free_bytes(path: PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def raise_if_out_of_space(e: BaseException, path: PathLike, needed: Optional[int], written: int = 0) -> None:
    """Raise :class:`DiskFullError` from ``e`` when it is a write that ran out of room; else return.

    Args:
        e: The exception a write raised.
        path: The file or folder being written (named in the message).
        needed: Bytes the whole write takes, when known.
        written: Bytes written before it failed (a lower bound when ``needed`` is unknown).
    """
    reason = out_of_space(e)
    if reason is None:
        return
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    need = f"it needs about {mib(needed)}" if needed else f"it needs more than the {mib(written)} written"
    raise DiskFullError(f"could not write {path}: {reason}; {need}, {mib(free_bytes(path))} free there; free "
                        "space or choose another folder") from e


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
