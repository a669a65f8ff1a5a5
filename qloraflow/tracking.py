"""Experiment tracking: a small protocol with an MLflow implementation and a no-op one.

The stages take a ``Tracker`` argument instead of importing mlflow, so the training function runs on
a GPU machine that has no mlflow. ``MlflowTracker`` uses ``MlflowClient`` with explicit run ids (no
global "active run"), so several runs can be open in one process and a resumed training attempt can
continue the run it started.

Failure policy (an unattended pipeline must not die for its bookkeeping):
- the tracking server unreachable at start -> ``TrackingError`` naming the URI, before any work;
- the server lost mid-run -> the record goes to ``<fallback_dir>/mlflow-fallback.jsonl``, the
  tracker marks itself degraded, and ``close()`` replays the buffer if the server is back.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Protocol

from qloraflow.errors import TrackingError

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


class MlflowTracker:
    """One MLflow run, opened (or reopened by ``run_id``) at construction.

    Args:
        experiment: experiment name (created if missing).
        tracking_uri: None resolves as ``resolve_tracking_uri``.
        run_id: continue this run instead of creating one (a resumed training attempt).
        run_name: name of a new run.
        parent_run_id: nest the new run under this one (a stage of a pipeline run).
        tags: tags set on a new run.
        fallback_dir: where records go while the server is unreachable.
    """

    def __init__(self, experiment: str, tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                 run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None, fallback_dir: str | os.PathLike = "."):
        # A lost server must cost seconds, not mlflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(tracking_uri)
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.fallback = Path(fallback_dir) / "mlflow-fallback.jsonl"
        self.degraded = False
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

    def _call(self, kind: str, fn: Any, *args: Any, payload: Any = None, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - any transport failure: keep training, keep the record
            if not self.degraded:
                print(f"[qloraflow] MLflow at {self.uri} failed ({type(e).__name__}); "
                      f"buffering to {self.fallback}", flush=True)
            self.degraded = True
            self.fallback.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback.open("a") as f:
                f.write(json.dumps({"kind": kind, "run_id": self.run_id, "time": time.time(),
                                    "payload": payload}, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("params", self.client.log_batch, self.run_id, params=items[i:i + 100],
                       payload={p.key: p.value for p in items[i:i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self._call("metrics", self.client.log_batch, self.run_id, metrics=items,
                       payload={"step": step, "metrics": {m.key: m.value for m in items}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("tags", self.client.log_batch, self.run_id, tags=items, payload={t.key: t.value for t in items})

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        self._call("artifact", fn, self.run_id, str(path), artifact_path,
                   payload={"path": str(path), "artifact_path": artifact_path})

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._call("dict", self.client.log_dict, self.run_id, data, artifact_file,
                   payload={"artifact_file": artifact_file})

    def log_inputs(self, datasets: list[Any]) -> None:
        """MLflow dataset inputs (``mlflow.entities.DatasetInput``, see ``qloraflow.lineage``) of this run."""
        if not datasets:
            return
        self._call("inputs", self.client.log_inputs, self.run_id, datasets=datasets,
                   payload=[{"name": d.dataset.name, "digest": d.dataset.digest} for d in datasets])

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self._call("table", self.client.log_table, self.run_id, data=data, artifact_file=artifact_file,
                   payload={"artifact_file": artifact_file})

    def close(self, status: str = "FINISHED") -> None:
        """End the run; replay buffered records first if the server is back."""
        if self.degraded:
            self._replay()
            self._call("tags", self.client.set_tag, self.run_id, "qloraflow.tracking_degraded",
                       str(self.degraded), payload={"qloraflow.tracking_degraded": True})
        self._call("terminate", self.client.set_terminated, self.run_id, status, payload={"status": status})

    def _replay(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        try:
            lines = [json.loads(l) for l in self.fallback.read_text().splitlines() if l.strip()]
            mine = [r for r in lines if r["run_id"] == self.run_id]
            for rec in mine:
                p, t = rec["payload"], int(rec["time"] * 1000)
                if rec["kind"] == "metrics":
                    self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, p["step"] or 0)
                                                                for k, v in p["metrics"].items()])
                elif rec["kind"] == "params":
                    self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in p.items()])
                elif rec["kind"] == "tags":
                    self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in p.items()])
            self.degraded = "replayed"  # the run says the server was lost, and that nothing was lost
        except Exception:  # noqa: BLE001 - still unreachable: the fallback file stays as the record
            pass


def _create_experiment(client: Any, name: str) -> str:
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 - another pipeline created it a moment ago
        return client.get_experiment_by_name(name).experiment_id
