"""Model registry and promotion gate on MLflow.

Every merged model becomes a version of a registered model, tagged with its metrics and lineage, and
keeps its per-record verdicts (``{record id: score}`` per metric, an artifact named by the
``gate.verdicts`` tag). The ``champion`` alias moves only through ``promote``, which pairs the
candidate with the base and with the current champion on the same test records and asks the lower
end of the improvement's confidence interval to clear the margin (:mod:`qloraflow.paired`);
``rollback`` moves it back one step::

    from qloraflow.registry import register_model, promote
    version = register_model(client, "tiny-sql", "runs:/<run>/merged_model", run_id, tags)
    decision = promote(client, "tiny-sql", version, metrics, base_metrics, "exact_match", margin=0.0,
                       smoke_passed=True, verdicts=candidate_by_id, base_verdicts=base_by_id, confidence=0.95)

A champion without stored verdicts (registered before they were kept) or with verdicts on other
records is compared by point estimate, and the decision's ``tests`` and ``reason`` say so; the
register task avoids that by re-evaluating such a champion on the candidate's test split.

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
from typing import Any, Callable, Optional

from qloraflow.errors import RegistryError
from qloraflow.files import file_lock
from qloraflow.paired import BINARY_METRICS, paired_test

ALIAS = "champion"
HISTORY_TAG = "qloraflow.champion_history"
# The gate metric and margin the last promotion used: ``qloraflow models``/``promote`` default to them, so a
# promotion by hand applies the pipeline's gate (configs/tiny.yaml gates on execution_accuracy, not exact_match).
GATE_METRIC_TAG = "qloraflow.gate_metric"
GATE_MARGIN_TAG = "qloraflow.gate_margin"


def client_for(tracking_uri: Optional[str] = None) -> Any:
    from mlflow.tracking import MlflowClient

    from qloraflow.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_model(client: Any, name: str, source: str, run_id: Optional[str], tags: dict[str, Any],
                   model_id: Optional[str] = None, description: Optional[str] = None) -> str:
    """Create a model version (and the registered model if needed); return the version number.

    ``model_id`` links the version to the MLflow logged model (``source`` is then ``models:/<model_id>``).
    """
    with contextlib.suppress(Exception):  # already exists, possibly created by a concurrent pipeline
        client.create_registered_model(name)
    from qloraflow.mlflow_model import global_store

    with global_store(client):  # a models:/m-... source is looked up in the global store
        mv = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                         model_id=model_id, description=description)
    if model_id is not None:  # the logged model names its versions (MLflow's Models tab shows "registered")
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        linked = json.loads((client.get_logged_model(model_id).tags or {}).get(MLFLOW_MODEL_VERSIONS, "[]"))
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            linked + [{"name": name, "version": str(mv.version)}])})
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
                  tags: dict[str, Any], model_id: Optional[str] = None,
                  description: Optional[str] = None) -> tuple[str, bool]:
    """Register the model unless a version with the same content digest exists; ``(version, created)``.

    The check and the registration hold the registry lock, so two executions that produced the same
    model at once register it once. Across hosts (where the file lock does not reach) the later one
    finds the earlier version after registering and deletes its own duplicate.
    """
    with _lock(name):
        existing = version_with_digest(client, name, digest)
        if existing is not None:
            return existing, False
        version = register_model(client, name, source, run_id, {**tags, DIGEST_TAG: digest}, model_id, description)
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


VERDICTS_TAG = "gate.verdicts"
"""Tag of a version: the artifact URI of its per-record verdicts (:func:`verdicts_document`)."""


def verdicts_document(samples: dict[str, Any], eval_key: str) -> dict[str, Any]:
    """What a registered version keeps so that the next candidate can be paired with it on the same records.

    Args:
        samples: The model's answers by record id, each with ``scores`` (``qloraflow.stages.Sample``).
        eval_key: Which test split and evaluation the scores come from (the ``eval_key`` tag).

    Returns:
        ``{"eval_key": ..., "metrics": {metric: {record id: score}}}``, JSON-ready.
    """
    metrics: dict[str, dict[str, float]] = {}
    for rid, sample in samples.items():
        for metric, value in (sample.scores if hasattr(sample, "scores") else sample["scores"]).items():
            metrics.setdefault(metric, {})[rid] = float(value)
    return {"eval_key": eval_key, "metrics": metrics}


def stored_verdicts(client: Any, version: Any, metric: str, eval_key: Optional[str] = None) -> Optional[dict[str, float]]:
    """A registered version's per-record scores on ``metric``, or None: none stored (versions registered
    before the gate kept them), another evaluation (``eval_key`` differs), or the file is unreadable."""
    uri = (version.tags or {}).get(VERDICTS_TAG)
    if not uri:
        return None
    try:
        import mlflow

        doc = json.loads(open(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=client.tracking_uri))
                         .read())
    except Exception:  # noqa: BLE001 - a deleted run or artifact: the gate falls back and says so
        return None
    if eval_key is not None and doc.get("eval_key") != eval_key:
        return None
    return doc.get("metrics", {}).get(metric)


def _compare(gate_metric: str, margin: float, cand: Optional[float], held: Optional[float], who: str,
             verdicts: Optional[dict[str, float]], reference: Optional[dict[str, float]], confidence: Optional[float],
             seed: int) -> dict[str, Any]:
    """One side of the gate: the candidate against ``who`` (the base, or the champion).

    Paired by record id when both sides' per-record verdicts cover the candidate's records and a
    ``confidence`` is set: the interval's lower end must clear the margin. Otherwise the point
    estimates are compared, and ``source`` says why.
    """
    out: dict[str, Any] = {"against": who, "candidate": cand, "reference": held}
    if confidence is not None and verdicts and reference is not None and all(i in reference for i in verdicts):
        test = paired_test(verdicts, {i: reference[i] for i in verdicts}, binary=gate_metric in BINARY_METRICS,
                           confidence=confidence, seed=seed, names=("the candidate", who))
        out.update(test.as_dict(), source="paired by record id", passed=test.lower > margin)
        interval = (f"{test.difference:+.4f} ({confidence:.0%} interval {test.lower:+.4f} to {test.upper:+.4f}, "
                    f"p={test.p_value:.3g}, n={test.n}, {test.method})")
        if out["passed"]:
            out["reason"] = f"{gate_metric} beats {who} by {interval}"
        elif test.difference > margin:
            out["reason"] = (f"{gate_metric} beats {who} by {interval} as a point estimate only: the interval's "
                             f"lower end is not above registry.promotion_margin {margin}, so not significantly")
        else:
            out["reason"] = f"{gate_metric} does not beat {who}: {interval}"
        return out
    why = ("registry.confidence is null" if confidence is None else
           "no per-record verdicts of the candidate" if not verdicts else
           f"{who} has no per-record verdicts on these test records")
    out.update(source=f"point estimates ({why})", difference=None if cand is None or held is None else cand - held)
    out["passed"] = held is None or (cand is not None and cand > held + margin)
    out["reason"] = (f"{gate_metric} {cand:.4f} vs {who}'s {held:.4f}, compared by point estimate ({why})"
                     if cand is not None and held is not None else f"{who} has no {gate_metric}")
    if not out["passed"]:
        out["reason"] = f"{gate_metric} {cand:.4f} does not beat {who}'s {held:.4f} by > {margin} ({why})"
    return out


def promote(client: Any, name: str, version: str, metrics: dict[str, float], base_metrics: dict[str, float],
            gate_metric: str, margin: float, smoke_passed: bool, *, verdicts: Optional[dict[str, float]] = None,
            base_verdicts: Optional[dict[str, float]] = None,
            champion_verdicts: Optional[Callable[[Any], Optional[dict[str, float]]]] = None,
            confidence: Optional[float] = 0.95, seed: int = 0) -> dict[str, Any]:
    """Move ``champion`` to ``version`` if it passed the smoke test and beats base and champion.

    With per-record verdicts (``{record id: score}`` on the gate metric) the candidate is paired with the
    base and with the champion on the same test records, and must beat each with the lower end of the
    improvement's ``confidence`` interval above ``margin`` (:mod:`qloraflow.paired`); without them, or
    for a champion that kept none, the point estimates are compared and the decision says so.

    Args:
        verdicts, base_verdicts: The candidate's and the base's verdicts on the test records.
        champion_verdicts: Given the champion's model version, its verdicts on the candidate's records
            (None when it has none); default: the ones stored with it (:func:`stored_verdicts`).
        confidence: The interval's level (``registry.confidence``); None compares point estimates.
        seed: Seed of the paired bootstrap (continuous metrics).

    Returns:
        The decision: ``promoted`` (bool), ``reason``, the compared values, ``tests`` (each side's
        difference, interval, p-value, n and how it was compared) and the champion after it.
    """
    cand = metrics.get(gate_metric)
    base = base_metrics.get(gate_metric)
    load = champion_verdicts or (lambda mv: stored_verdicts(client, mv, gate_metric))
    with _lock(name):
        client.set_registered_model_tag(name, GATE_METRIC_TAG, gate_metric)
        client.set_registered_model_tag(name, GATE_MARGIN_TAG, str(margin))
        current = champion(client, name)
        held = _metric(current, gate_metric) if current is not None else None
        reasons, tests = [], {}
        if not smoke_passed:
            reasons.append("the serving smoke test did not pass")
        if cand is None:
            reasons.append(f"the candidate has no {gate_metric}")
        else:
            if base is not None:
                tests["base"] = _compare(gate_metric, margin, cand, base, "the base", verdicts, base_verdicts,
                                         confidence, seed)
            if current is not None and str(current.version) != str(version):
                tests["champion"] = _compare(gate_metric, margin, cand, held, f"champion v{current.version}", verdicts,
                                             load(current), confidence, seed)
            elif current is not None:
                reasons.append(f"version {version} is the champion already")
            reasons += [t["reason"] for t in tests.values() if not t["passed"]]
        if not reasons:
            set_champion(client, name, version)
    if not reasons:
        _settle(client, name, gate_metric)
    now = champion(client, name)
    return {"promoted": not reasons and now is not None and str(now.version) == str(version),
            "reason": "; ".join(reasons) or "; ".join(t["reason"] for t in tests.values())
            or f"beats base and champion on {gate_metric}",
            "candidate": cand, "base": base, "previous_champion": current.version if current else None,
            "previous_champion_metric": held, "champion": now.version if now else None, "tests": tests}


def decision_tags(decision: dict[str, Any]) -> dict[str, str]:
    """The gate's decision as tags (of the registered version and the pipeline's MLflow run)."""
    tags = {"gate.promoted": str(decision["promoted"]), "gate.reason": decision["reason"][:4000]}
    for side, test in decision.get("tests", {}).items():
        tags.update({f"gate.vs_{side}.{k}": str(test[k]) for k in
                     ("difference", "lower", "upper", "p_value", "n", "confidence", "method", "source", "passed")
                     if test.get(k) is not None})
    return tags


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
