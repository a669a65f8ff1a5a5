"""Model registry and promotion gate on MLflow.

Every merged model becomes a version of a registered model, tagged with its metrics and lineage.
The ``champion`` alias moves only through ``promote``, which compares the candidate with the base and
with the current champion on the gate metric; ``rollback`` moves it back one step::

    from qloraflow.registry import register_model, promote
    version = register_model(client, "tiny-sql", "runs:/<run>/merged_model", run_id, tags)
    decision = promote(client, "tiny-sql", version, metrics, base_metrics, "exact_match", margin=0.0,
                       smoke_passed=True)

Concurrency: an alias names one version by construction, so two champions cannot exist. Two
promotions racing could still let the worse one write last; ``promote`` therefore holds a lock (a
file lock next to a local store, and for any store re-reads the champion after moving the alias and
re-promotes the better one) so the best eligible version ends as champion and no version is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Any, Optional

from qloraflow.errors import RegistryError
from qloraflow.files import file_lock

ALIAS = "champion"
HISTORY_TAG = "qloraflow.champion_history"


def client_for(tracking_uri: Optional[str] = None) -> Any:
    from mlflow.tracking import MlflowClient

    from qloraflow.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_model(client: Any, name: str, source: str, run_id: Optional[str], tags: dict[str, Any]) -> str:
    """Create a model version (and the registered model if needed); return the version number."""
    with contextlib.suppress(Exception):  # already exists, possibly created by a concurrent pipeline
        client.create_registered_model(name)
    mv = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    for _ in range(60):  # file stores are READY at once; a server may copy artifacts first
        if client.get_model_version(name, mv.version).status == "READY":
            break
        time.sleep(1)
    return str(mv.version)


DIGEST_TAG = "model.sha256"


def version_with_digest(client: Any, name: str, digest: str) -> Optional[str]:
    """The version already registered with this content digest (the same merged model), if any."""
    found = [mv for mv in client.search_model_versions(f"name='{name}'") if (mv.tags or {}).get(DIGEST_TAG) == digest]
    return str(min(int(mv.version) for mv in found)) if found else None


def register_once(client: Any, name: str, digest: str, source: str, run_id: Optional[str],
                  tags: dict[str, Any]) -> tuple[str, bool]:
    """Register the model unless a version with the same content digest exists; ``(version, created)``.

    The check and the registration hold the registry lock, so two executions that produced the same
    model at once register it once. Across hosts (where the file lock does not reach) the later one
    finds the earlier version after registering and deletes its own duplicate.
    """
    with _lock(name):
        existing = version_with_digest(client, name, digest)
        if existing is not None:
            return existing, False
        version = register_model(client, name, source, run_id, {**tags, DIGEST_TAG: digest})
    first = version_with_digest(client, name, digest)
    if first is not None and first != version:
        client.delete_model_version(name, version)
        return first, False
    return version, True


def champion(client: Any, name: str) -> Optional[Any]:
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # noqa: BLE001 - no champion yet (MlflowException: alias not found)
        return None


def _metric(version: Any, metric: str) -> Optional[float]:
    value = (version.tags or {}).get(f"metric.{metric}")
    return float(value) if value is not None else None


def _lock(name: str) -> contextlib.AbstractContextManager:
    """Promotions of one registered model, one at a time (on this machine)."""
    return file_lock(os.path.join(tempfile.gettempdir(), f"qloraflow-registry-{name}.lock"))


def _history(client: Any, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def set_champion(client: Any, name: str, version: str) -> None:
    """Point ``champion`` at ``version`` and record it in the history rollback reads (no gate)."""
    history = _history(client, name)
    client.set_registered_model_alias(name, ALIAS, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps((history + [version])[-50:]))


def promote(client: Any, name: str, version: str, metrics: dict[str, float], base_metrics: dict[str, float],
            gate_metric: str, margin: float, smoke_passed: bool) -> dict[str, Any]:
    """Move ``champion`` to ``version`` if it passed the smoke test and beats base and champion.

    Returns:
        The decision: ``promoted`` (bool), ``reason``, the compared values and the champion after it.
    """
    cand = metrics.get(gate_metric)
    base = base_metrics.get(gate_metric)
    with _lock(name):
        current = champion(client, name)
        held = _metric(current, gate_metric) if current is not None else None
        reasons = []
        if not smoke_passed:
            reasons.append("the serving smoke test did not pass")
        if cand is None:
            reasons.append(f"the candidate has no {gate_metric}")
        else:
            if base is not None and not cand > base + margin:
                reasons.append(f"{gate_metric} {cand:.4f} does not beat the base's {base:.4f} by > {margin}")
            if held is not None and not cand > held + margin:
                reasons.append(f"{gate_metric} {cand:.4f} does not beat champion v{current.version}'s "
                               f"{held:.4f} by > {margin}")
        if not reasons:
            set_champion(client, name, version)
    if not reasons:
        _settle(client, name, gate_metric)
    now = champion(client, name)
    return {"promoted": not reasons and now is not None and str(now.version) == str(version),
            "reason": "; ".join(reasons) or f"beats base and champion on {gate_metric}",
            "candidate": cand, "base": base, "previous_champion": current.version if current else None,
            "previous_champion_metric": held, "champion": now.version if now else None}


def _settle(client: Any, name: str, gate_metric: str) -> None:
    """Across hosts the file lock does not hold: re-check that the best promoted version is champion."""
    history = _history(client, name)
    if not history:
        return
    best = max(history, key=lambda v: _metric(client.get_model_version(name, v), gate_metric) or float("-inf"))
    current = champion(client, name)
    if current is None or str(current.version) != str(best):
        if (_metric(client.get_model_version(name, best), gate_metric) or float("-inf")) > \
                (_metric(current, gate_metric) if current else float("-inf")):
            client.set_registered_model_alias(name, ALIAS, best)


def rollback(client: Any, name: str) -> dict[str, Any]:
    """Point ``champion`` back at the version that held it before the current one.

    Raises:
        RegistryError: there is no earlier champion.
    """
    with _lock(name):
        history = _history(client, name)
        current = champion(client, name)
        if current is None or len(history) < 2:
            raise RegistryError(f"model {name!r} has no earlier champion to roll back to (history: {history})")
        while history and history[-1] == str(current.version):
            history.pop()
        if not history:
            raise RegistryError(f"model {name!r} has no earlier champion to roll back to")
        previous = history[-1]
        client.set_registered_model_alias(name, ALIAS, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return {"from": current.version, "to": previous}


def list_versions(client: Any, name: str) -> list[dict[str, Any]]:
    """Every version with its metrics tags and whether it is champion."""
    cur = champion(client, name)
    out = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        out.append({"version": mv.version, "champion": cur is not None and mv.version == cur.version,
                    "run_id": mv.run_id, "source": mv.source,
                    **{k: v for k, v in (mv.tags or {}).items() if k.startswith(("metric.", "dataset", "config"))}})
    return out
