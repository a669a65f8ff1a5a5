"""What an MLflow run was sent while its server was unreachable, kept whole until it is replayed.

``qloraflow.tracking.MlflowTracker`` writes here when a call fails; nothing is kept by name only. One
outage of one tracker is one folder, ``<fallback_dir>/mlflow-buffer/<run id>-<token>/``::

    buffer.json      the tracking URI and the run id
    records.jsonl    one line per call, in the order made: seq, kind, time, payload
    replayed.jsonl   the seqs already replayed (or rejected by the server, with its message)
    files/<seq>...   the content: a copy of each artifact (file or folder), each dict and table as JSON

Replaying sends the records in order and ticks each off in ``replayed.jsonl``, so a replay cut short
by a second outage resumes where it stopped without sending anything twice. A ``close()`` that
could not reach the server is an ``end`` record: the replay ends the run FINISHED or FAILED.

A pointer ``<pending dir>/<buffer>.json`` (``$QLORAFLOW_TRACKING_PENDING``, else
``~/.cache/qloraflow/mlflow-pending``) names each buffer not yet replayed, so the next tracker opened
on the same tracking URI (the next stage) or ``qloraflow tracking replay`` finds it. The tracker that
writes a buffer holds an ``flock`` on its ``records.jsonl``; others replay only buffers nobody holds
(the kernel drops the lock when its holder dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from qloraflow.files import write_atomic

DEGRADED_TAG = "qloraflow.tracking_degraded"
"""Human-readable: ``replayed: buffered 6 (artifact 1, dict 1, ...), replayed 6, rejected 0, pending 0``."""
BUFFERS_TAG = "qloraflow.tracking_buffers"
"""JSON: per buffer, its counts per kind (``buffered``, ``replayed``, ``rejected``, ``pending``)."""

# Files above this are hard-linked into the buffer where the filesystem allows (the pipeline publishes
# files by rename, never rewrites them in place, so the link keeps the bytes logged); smaller ones are copied.
_LINK_ABOVE_BYTES = 64 << 20

# The server answered, and would answer the same again: retrying such a record can never succeed.
_REJECTED_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                   "RESOURCE_ALREADY_EXISTS"}


def pending_dir() -> Path:
    """Where the pointers to buffers not yet replayed live."""
    configured = os.environ.get("QLORAFLOW_TRACKING_PENDING")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qloraflow" / "mlflow-pending"


def is_rejection(e: BaseException) -> bool:
    """True when retrying the call cannot help: the server refused it, or the call itself is wrong."""
    from mlflow.exceptions import RestException

    if isinstance(e, RestException):
        return e.json.get("error_code") in _REJECTED_CODES
    return isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError))


def send_record(client: Any, run_id: str, kind: str, payload: dict[str, Any], folder: Optional[Path] = None) -> None:
    """Make one call to MLflow from a record: live (``folder`` None) or replayed from a buffer."""
    from mlflow.entities import Metric, Param, RunTag

    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), payload["timestamp"], payload["step"])
                                          for k, v in payload["metrics"].items()])
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in payload.items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
    elif kind == "artifact":
        path = folder / payload["path"] if folder else Path(payload["path"])
        log = client.log_artifacts if path.is_dir() else client.log_artifact
        log(run_id, str(path), payload["artifact_path"])
    elif kind in ("dict", "table"):
        data = json.loads((folder / payload["file"]).read_text("utf-8")) if folder else payload["data"]
        if kind == "dict":
            client.log_dict(run_id, data, payload["artifact_file"])
        else:
            client.log_table(run_id, data=data, artifact_file=payload["artifact_file"])
    elif kind == "inputs":
        client.log_inputs(run_id, datasets=[_dataset_input(d) for d in payload["datasets"]])
    elif kind == "end":
        client.set_terminated(run_id, payload["status"], end_time=payload["end_time"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def dataset_record(d: Any) -> dict[str, Any]:
    """A ``DatasetInput`` as plain JSON (its dataset's fields and its tags), for the buffer."""
    ds = d.dataset
    return {"name": ds.name, "digest": ds.digest, "source_type": ds.source_type, "source": ds.source,
            "schema": ds.schema, "profile": ds.profile, "tags": {t.key: t.value for t in d.tags or []}}


def _dataset_input(r: dict[str, Any]) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset(name=r["name"], digest=r["digest"], source_type=r["source_type"], source=r["source"],
                                schema=r.get("schema"), profile=r.get("profile")),
                        tags=[InputTag(k, v) for k, v in r["tags"].items()])


def _keep_copy(src: Path, dst: Path) -> None:
    def link_or_copy(s: str, d: str) -> None:
        if os.path.getsize(s) > _LINK_ABOVE_BYTES:
            try:
                os.link(s, d)
                return
            except OSError:
                pass  # another filesystem, or links not allowed: copy
        shutil.copy2(s, d)

    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy)
    else:
        link_or_copy(str(src), str(dst))


class Buffer:
    """One buffer folder, held (``flock`` on ``records.jsonl``) by the process that writes or replays it."""

    def __init__(self, folder: Path, handle: Any):
        self.folder = folder
        self._handle = handle
        self.header = json.loads((folder / "buffer.json").read_text("utf-8"))
        self._next_seq = len(self.records())

    @property
    def run_id(self) -> str:
        return self.header["run_id"]

    @property
    def pointer(self) -> Path:
        """The pending pointer, where it was written (the pending folder may differ for the replayer)."""
        return Path(self.header["pointer"])

    @classmethod
    def create(cls, root: Path, tracking_uri: str, run_id: str) -> "Buffer":
        """A new buffer under ``root`` for ``run_id``, held by this process, with its pending pointer."""
        folder = Path(root).resolve() / f"{run_id}-{uuid.uuid4().hex[:8]}"
        (folder / "files").mkdir(parents=True)
        pointer = pending_dir().resolve() / f"{folder.name}.json"
        write_atomic(folder / "buffer.json", json.dumps({"tracking_uri": tracking_uri, "run_id": run_id,
                                                         "created": time.time(), "pointer": str(pointer)}))
        handle = open(folder / "records.jsonl", "a", encoding="utf-8")
        fcntl.flock(handle, fcntl.LOCK_EX)
        buffer = cls(folder, handle)
        buffer.pointer.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(buffer.pointer, json.dumps({"buffer": str(folder), "tracking_uri": tracking_uri,
                                                 "run_id": run_id}))
        return buffer

    @classmethod
    def claim(cls, folder: Path) -> Optional["Buffer"]:
        """Hold an existing buffer, or None if another process holds it or it is gone."""
        try:
            fd = os.open(Path(folder) / "records.jsonl", os.O_RDWR | os.O_APPEND)  # no O_CREAT: gone is gone
        except FileNotFoundError:
            return None
        handle = os.fdopen(fd, "a", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None  # its writer is alive and replays it itself
            raise
        if os.fstat(handle.fileno()).st_nlink == 0:  # replayed and removed while we waited
            handle.close()
            return None
        return cls(Path(folder), handle)

    def append(self, kind: str, payload: dict[str, Any]) -> None:
        """Keep one call, with its content: an artifact is copied, a dict or table written as JSON."""
        seq, payload = self._next_seq, dict(payload)
        if kind == "artifact":
            src = Path(payload["path"])
            rel = f"files/{seq}/{src.name}"
            _keep_copy(src, self.folder / rel)
            payload.update(path=rel, source=str(src))
        elif kind in ("dict", "table"):
            data = payload.pop("data")
            if hasattr(data, "to_dict"):  # a DataFrame table
                data = data.to_dict(orient="list")
            payload["file"] = f"files/{seq}.json"
            write_atomic(self.folder / payload["file"], json.dumps(data, default=str))
        self._handle.write(json.dumps({"seq": seq, "kind": kind, "time": time.time(), "payload": payload},
                                      default=str) + "\n")
        self._handle.flush()
        self._next_seq += 1

    def records(self) -> list[dict[str, Any]]:
        text = (self.folder / "records.jsonl").read_text("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def done(self) -> dict[int, Optional[str]]:
        """seq -> None (replayed) or the server's reason for rejecting it."""
        path = self.folder / "replayed.jsonl"
        lines = path.read_text("utf-8").splitlines() if path.exists() else []
        return {r["seq"]: r.get("rejected") for r in map(json.loads, filter(str.strip, lines))}

    def mark(self, seq: int, rejected: Optional[str] = None) -> None:
        with open(self.folder / "replayed.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"seq": seq, **({"rejected": rejected} if rejected else {})}) + "\n")

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind (the ``end`` record aside): how many were buffered, replayed, rejected, are pending."""
        done = self.done()
        out: dict[str, dict[str, int]] = {"buffered": {}, "replayed": {}, "rejected": {}, "pending": {}}
        for r in self.records():
            if r["kind"] == "end":
                continue
            state = "pending" if r["seq"] not in done else "rejected" if done[r["seq"]] else "replayed"
            for key in ("buffered", state):
                out[key][r["kind"]] = out[key].get(r["kind"], 0) + 1
        return out

    def release(self) -> None:
        """Let go of the buffer (it stays, pending, for the next tracker or ``qloraflow tracking replay``)."""
        self._handle.close()

    def remove(self) -> None:
        """Everything replayed: delete the copies and the pointer (a buffer with rejections stays, as their record)."""
        self.pointer.unlink(missing_ok=True)
        if any(self.done().values()):
            print(f"[qloraflow] the MLflow server rejected records of run {self.run_id}; they stay in {self.folder}",
                  flush=True)
            self._handle.close()
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()  # the mlflow-buffer folder, when this was its last buffer
        self._handle.close()


@dataclass
class ReplayResult:
    """What one replay of one buffer did."""

    buffer: Path
    run_id: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    complete: bool = False
    ended: Optional[str] = None
    error: Optional[str] = None

    def summary(self) -> str:
        return describe(self.counts)


def describe(counts: dict[str, dict[str, int]]) -> str:
    """``replayed: buffered 6 (artifact 1, dict 1, ...), replayed 6, rejected 0, pending 0``."""
    total = {k: sum(v.values()) for k, v in counts.items()}
    state = "pending" if total["pending"] else "rejected" if total["rejected"] else "replayed"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(counts["buffered"].items()))
    return (f"{state}: buffered {total['buffered']} ({kinds}), replayed {total['replayed']}, "
            f"rejected {total['rejected']}, pending {total['pending']}")


def replay_buffer(buffer: Buffer, client: Any) -> ReplayResult:
    """Send a buffer's records not yet replayed, in order; then the degraded tags; then its end, if any.

    Stops at the first transport failure (the rest stays pending, nothing is sent twice); a record the
    server refuses is marked rejected, counted in the tags, and the replay goes on.
    """
    result = ReplayResult(buffer.folder, buffer.run_id)
    done, records = buffer.done(), buffer.records()
    end = [r for r in records if r["kind"] == "end" and r["seq"] not in done]
    for rec in [r for r in records if r["kind"] != "end" and r["seq"] not in done] + ["tags"] + end:
        try:
            if rec == "tags":
                _set_degraded_tags(client, buffer)
                continue
            send_record(client, buffer.run_id, rec["kind"], rec["payload"], buffer.folder)
        except Exception as e:  # noqa: BLE001 - a rejection is recorded; anything else means: later
            if rec == "tags" or not is_rejection(e):
                result.error = f"{type(e).__name__}: {e}"[:500]
                result.counts = buffer.counts()
                return result
            print(f"[qloraflow] MLflow rejected buffered {rec['kind']} #{rec['seq']} of run {buffer.run_id}: {e}",
                  flush=True)
            buffer.mark(rec["seq"], rejected=f"{type(e).__name__}: {e}"[:1000])
            continue
        buffer.mark(rec["seq"])
        if rec["kind"] == "end":
            result.ended = rec["payload"]["status"]
    result.counts, result.complete = buffer.counts(), True
    return result


def _set_degraded_tags(client: Any, buffer: Buffer) -> None:
    """Merge this buffer's counts into the run's tags: several outages of one run add up."""
    from mlflow.entities import RunTag

    counts = buffer.counts()
    try:
        per_buffer = json.loads(client.get_run(buffer.run_id).data.tags.get(BUFFERS_TAG, "{}"))
    except json.JSONDecodeError:
        per_buffer = {}
    per_buffer[buffer.folder.name] = counts
    total: dict[str, dict[str, int]] = {k: {} for k in counts}
    for entry in per_buffer.values():
        for state, kinds in entry.items():
            for kind, n in kinds.items():
                total.setdefault(state, {})[kind] = total.setdefault(state, {}).get(kind, 0) + n
    client.log_batch(buffer.run_id, tags=[RunTag(DEGRADED_TAG, describe(total)),
                                          RunTag(BUFFERS_TAG, json.dumps(per_buffer, sort_keys=True)[:7000])])
