"""Experiment tracking: a small protocol with an MLflow implementation and a no-op one.

The stages take a ``Tracker`` argument instead of importing mlflow, so the training function runs on
a GPU machine that has no mlflow. ``MlflowTracker`` uses ``MlflowClient`` with explicit run ids (no
global "active run"), so several runs can be open in one process and a resumed training attempt can
continue the run it started.

Failure policy (an unattended pipeline must not die for its bookkeeping, and must not lose it):
- the tracking server unreachable at start -> ``TrackingError`` naming the URI, before any work;
- the server lost mid-run -> each call goes, with its content (artifact copies, dicts and tables as
  JSON), to a buffer under ``<fallback_dir>/mlflow-buffer/`` (``qloraflow.tracking_buffer``), and a
  circuit breaker opens: later calls go straight to the buffer, without waiting on the network, until
  a cheap health probe (at most every few seconds, backing off) answers; then the buffer is replayed
  in order and the run tagged ``qloraflow.tracking_degraded`` with what was buffered and replayed;
- the server still lost at ``close()`` -> the end status is buffered too; the next tracker opened on
  the same URI (the next stage) or ``qloraflow tracking replay [FOLDER]`` replays it and ends the run;
- a fresh SQLite store is created and migrated under a file lock, so first runs may start at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Protocol

from qloraflow.errors import TrackingError
from qloraflow.files import file_lock
from qloraflow.tracking_buffer import (Buffer, ReplayResult, dataset_record, is_rejection, pending_dir, replay_buffer,
                                      send_record)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The MLflow 3 UI opens an experiment without this tag on its GenAI pages (traces, prompts); with it, on
# the runs, metrics and models of model training. The values are the UI's (``ExperimentKind``).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class Tracker(Protocol):
    run_id: Optional[str]

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing: for library use without MLflow and for the GPU benchmark."""

    run_id: Optional[str] = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        pass

    def log_dict(self, data: Any, artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer its health check.

    Raises:
        TrackingError: naming the URI and how to point the pipeline elsewhere.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except OSError as e:
        reason = str(e)
    raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, or set "
                        "MLFLOW_TRACKING_URI / tracking.tracking_uri to a reachable server or sqlite:///mlflow.db")


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``; a SQLite store is created and migrated by one process at a time.

    MLflow creates a missing SQLite store's tables on first use with alembic migrations; two processes
    doing that at once on a fresh file fail ("Online migration expected to match one row"). Under the
    lock the second one waits and then finds the tables made.
    """
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    with file_lock(db.with_name(db.name + ".lock")):
        return MlflowClient(tracking_uri=uri)  # builds the store (and its tables) now, not at first call


class MlflowTracker:
    """One MLflow run, opened (or reopened by ``run_id``) at construction.

    Args:
        experiment: experiment name (created if missing).
        tracking_uri: None resolves as ``resolve_tracking_uri``.
        run_id: continue this run instead of creating one (a resumed training attempt).
        run_name: name of a new run.
        parent_run_id: nest the new run under this one (a stage of a pipeline run).
        tags: tags set on a new run.
        fallback_dir: where the buffer goes while the server is unreachable.
        probe_interval_s: the first wait before probing a lost server again; it doubles per failed
            probe, up to a minute, so a hung server costs one probe timeout a minute at most.
    """

    def __init__(self, experiment: str, tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                 run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None, fallback_dir: str | os.PathLike = ".",
                 probe_interval_s: float = 5.0):
        # A lost server must cost one timeout, not mlflow's default minutes of retries: the buffer
        # and the breaker's probe are the retry.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.uri = resolve_tracking_uri(tracking_uri)
        check_reachable(self.uri)
        self.client = open_client(self.uri)
        self.fallback_dir = Path(fallback_dir)
        self.degraded = False  # True once anything was buffered
        self._buffer: Optional[Buffer] = None
        self._lock = threading.RLock()  # a Trainer callback thread and the task may log at once
        self._breaker_open = False
        self._probe_every = self._probe_interval = probe_interval_s
        self._next_probe = 0.0
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else _create_experiment(self.client, experiment)
            if exp is not None and EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # made by an older version
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            all_tags = {k: str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        # An earlier stage that lost the server and ended before it came back left its buffer pending.
        try:
            for result in replay_pending(tracking_uri=self.uri, client=self.client, only_uri=self.uri):
                print(f"[qloraflow] replayed the pending MLflow buffer of run {result.run_id}: {result.summary()}",
                      flush=True)
        except Exception as e:  # noqa: BLE001 - the buffers stay pending; this stage's own run is fine
            print(f"[qloraflow] WARNING: replaying pending MLflow buffers failed ({type(e).__name__}: {e}); "
                  "they stay pending: qloraflow tracking replay", flush=True)

    @property
    def buffer_dir(self) -> Optional[Path]:
        """The folder of this tracker's pending buffer, if anything is waiting for the server."""
        return self._buffer.folder if self._buffer else None

    def _call(self, kind: str, payload: dict[str, Any]) -> None:
        with self._lock:
            if (self._breaker_open or self._buffer is not None) and not self._recover():
                self._keep(kind, payload)
                return
            try:
                send_record(self.client, self.run_id, kind, payload)
            except Exception as e:  # noqa: BLE001 - any transport failure: keep training, keep the record
                if is_rejection(e):  # the server is there and said no: buffering cannot help
                    print(f"[qloraflow] MLflow rejected {kind} for run {self.run_id}: {e}", flush=True)
                    return
                self._trip(e)
                self._keep(kind, payload)

    def _trip(self, e: BaseException) -> None:
        if not self._breaker_open:
            print(f"[qloraflow] MLflow at {self.uri} failed ({type(e).__name__}: {str(e)[:200]}); buffering "
                  f"under {self.fallback_dir / 'mlflow-buffer'} until it answers again", flush=True)
        self._breaker_open = True
        self._next_probe = time.monotonic() + self._probe_every

    def _keep(self, kind: str, payload: dict[str, Any]) -> None:
        try:
            if self._buffer is None:
                self._buffer = Buffer.create(self.fallback_dir / "mlflow-buffer", self.uri, self.run_id)
            self._buffer.append(kind, payload)
            self.degraded = True
        except OSError as e:  # a full disk as well: say loudly what was not kept
            print(f"[qloraflow] ERROR: MLflow is unreachable and the {kind} record of run {self.run_id} could "
                  f"not be buffered under {self.fallback_dir}: {e}; it is lost", flush=True)

    def _recover(self, force: bool = False) -> bool:
        """Probe the server (when due), replay the buffer if it answers; True when calls may go live."""
        if self._breaker_open:
            if not force and time.monotonic() < self._next_probe:
                return False
            if not self._probe():
                self._probe_every = min(self._probe_every * 2, 60.0)
                self._next_probe = time.monotonic() + self._probe_every
                return False
            self._breaker_open, self._probe_every = False, self._probe_interval
        if self._buffer is not None:
            result = replay_buffer(self._buffer, self.client)
            if not result.complete:
                self._trip(RuntimeError(result.error))
                return False
            print(f"[qloraflow] MLflow at {self.uri} is back; run {self.run_id} {result.summary()}", flush=True)
            self._buffer.remove()
            self._buffer = None
        return True

    def _probe(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True  # a local store has no health check: the next call is the probe
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_params(self, params: dict[str, Any]) -> None:
        items = {k: str(v)[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):
            self._call("params", {k: items[k] for k in keys[i:i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._call("metrics", {"step": step or 0, "timestamp": int(time.time() * 1000), "metrics": values})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self._call("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._call("dict", {"artifact_file": artifact_file, "data": data})

    def log_inputs(self, datasets: list[Any]) -> None:
        """MLflow dataset inputs (``mlflow.entities.DatasetInput``, see ``qloraflow.lineage``) of this run."""
        if datasets:
            self._call("inputs", {"datasets": [dataset_record(d) for d in datasets]})

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self._call("table", {"artifact_file": artifact_file, "data": data})

    def close(self, status: str = "FINISHED") -> None:
        """End the run: replay the buffer first if the server is back, else buffer the end as well."""
        with self._lock:
            if self._breaker_open or self._buffer is not None:
                self._recover(force=True)
            self._call("end", {"status": status, "end_time": int(time.time() * 1000)})
            if self._buffer is not None:
                print(f"[qloraflow] MLflow at {self.uri} is still unreachable: run {self.run_id} ends {status} "
                      f"when its buffer is replayed: by the next stage, or: qloraflow tracking replay "
                      f"{self._buffer.folder}", flush=True)
                self._buffer.release()  # now the next tracker, or the replay command, may take it
                self._buffer = None


def end_run(experiment: str, tracking_uri: Optional[str], run_id: str, status: str, tags: dict[str, Any],
            fallback_dir: str | os.PathLike) -> None:
    """End a run that another process opened (a pipeline's run, from the stage that failed), with ``tags``.

    Live when the server answers; otherwise the tags and the end go to a buffer under ``fallback_dir``,
    which the next tracker on that URI or ``qloraflow tracking replay`` replays, so the run does not
    stay RUNNING because the server was down at the moment the pipeline failed.
    """
    try:
        tracker = MlflowTracker(experiment, tracking_uri, run_id=run_id, fallback_dir=fallback_dir)
    except Exception as e:  # noqa: BLE001 - unreachable (TrackingError) or lost while reopening the run
        uri = resolve_tracking_uri(tracking_uri)
        buffer = Buffer.create(Path(fallback_dir) / "mlflow-buffer", uri, run_id)
        buffer.append("tags", {k: str(v) for k, v in tags.items()})
        buffer.append("end", {"status": status, "end_time": int(time.time() * 1000)})
        buffer.release()
        print(f"[qloraflow] MLflow at {uri} is unreachable ({type(e).__name__}): run {run_id} ends {status} when "
              f"{buffer.folder} is replayed: by the next stage, or: qloraflow tracking replay {buffer.folder}",
              flush=True)
        return
    tracker.set_tags(tags)
    tracker.close(status)


def replay_pending(folder: Optional[str | os.PathLike] = None, tracking_uri: Optional[str] = None,
                   client: Any = None, only_uri: Optional[str] = None) -> list[ReplayResult]:
    """Replay the buffers under ``folder`` (every buffer below it), else those the pending folder names.

    Args:
        folder: a folder holding buffers (``mlflow-buffer/`` of a stage, a remote task's downloaded
            outputs); None: every pending buffer of this machine.
        tracking_uri: replay into this store instead of the one each buffer names (e.g. a port-forward
            to the in-cluster server the buffer was written for).
        client: an open client on ``tracking_uri``.
        only_uri: replay only the buffers written for this tracking URI (a tracker at start).

    Returns:
        One result per buffer taken (buffers held by a live tracker are left to it).
    """
    import json

    if folder is not None:
        found = sorted(p.parent for p in Path(folder).rglob("records.jsonl") if (p.parent / "buffer.json").exists())
    else:
        found = []
        pointers = sorted(pending_dir().glob("*.json")) if pending_dir().is_dir() else []
        for pointer in pointers:
            named = json.loads(pointer.read_text("utf-8"))
            if only_uri and named.get("tracking_uri") != only_uri:
                continue
            target = Path(named["buffer"])
            if (target / "records.jsonl").exists():
                found.append(target)
            else:  # its folder was deleted (a temporary working directory): say so, once
                print(f"[qloraflow] WARNING: the MLflow buffer {target} named by {pointer} is gone; "
                      "its records cannot be replayed", flush=True)
                pointer.unlink(missing_ok=True)
    results = []
    clients = {tracking_uri: client} if client is not None else {}
    for buffer in filter(None, map(Buffer.claim, found)):
        try:
            uri = tracking_uri or buffer.header["tracking_uri"]
            if only_uri and buffer.header["tracking_uri"] != only_uri:
                continue
            if uri not in clients:
                check_reachable(uri)
                clients[uri] = open_client(uri)
            result = replay_buffer(buffer, clients[uri])
            results.append(result)
            if result.complete:
                buffer.remove()
        finally:
            buffer.release()
    return results


def replay_command(folder: Optional[str], tracking_uri: Optional[str]) -> int:
    """``qloraflow tracking replay [FOLDER]``: 0 when every buffer found was replayed whole, 2 for no FOLDER."""
    if folder is not None and not Path(folder).is_dir():
        print(f"error: {folder}: no such folder; give the folder of a stage's outputs (its mlflow-buffer/ is "
              "searched below it), or leave FOLDER out to replay every pending buffer of this machine",
              file=sys.stderr)
        return 2
    results = replay_pending(folder, tracking_uri)
    where = folder or pending_dir()
    if not results:
        print(f"no pending MLflow buffers in {where}")
    for r in results:
        ended = f"; run ended {r.ended}" if r.ended else ""
        error = f"; stopped: {r.error}" if r.error else ""
        print(f"run {r.run_id}: {r.summary()}{ended}{error} ({r.buffer})")
    return 0 if all(r.complete for r in results) else 1


def _create_experiment(client: Any, name: str) -> str:
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 - another pipeline created it a moment ago
        return client.get_experiment_by_name(name).experiment_id
