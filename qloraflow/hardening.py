"""What locks the served model down in a cluster, and the policy linter that checks it.

``qloraflow.deploy`` builds its pods from these pieces: non-root containers with a read-only root
filesystem, no capabilities and the runtime's seccomp profile; the API key and the MLflow
tracking URI with its credentials from Secrets, never in the manifest; the keyguard middleware
(``qloraflow.keyguard``) from a ConfigMap; and a NetworkPolicy that admits only the declared
clients. ``lint_manifests`` runs checkov's Kubernetes policies on rendered manifests::

    from qloraflow.deploy import render_manifests
    from qloraflow.hardening import lint_manifests

    failed = lint_manifests(render_manifests("models:/tiny-sql@champion", "tiny-sql", "3"))
    assert not failed, failed
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import yaml

from qloraflow import keyguard
from qloraflow.errors import ConfigError

# A UID above 10000 that no image user owns: it cannot collide with a user on the node (checkov CKV_K8S_40).
RUN_AS_USER = 10001
API_KEY_SECRET = "vllm-api-key"  # key VLLM_API_KEY
TRACKING_SECRET = "mlflow-tracking"  # key MLFLOW_TRACKING_URI, plus any credentials the download needs
TRACKING_URI_KEY = "MLFLOW_TRACKING_URI"
KEYGUARD_MOUNT = "/opt/qloraflow"
CACHE_MOUNT = "/cache"
ANNOTATION_KEYGUARD = "qloraflow.io/keyguard-sha256"
# Clients the NetworkPolicy admits by default: pods of the same namespace carrying this label.
DEFAULT_CLIENT_LABELS = {"qloraflow.io/vllm-client": "true"}

# checkov policies these manifests do not meet on purpose, each with the reason.
ACCEPTED_CHECKS = {
    "CKV_K8S_43": "images are pinned release tags; pass --image repo@sha256:... to pin a digest",
    "CKV_K8S_35": "vLLM reads its key only from VLLM_API_KEY or argv, MLflow its URI and credentials only "
                  "from the environment; the environment keeps them out of `ps`",
    "CKV_K8S_21": "the namespace is the operator's: --namespace renders it, else kubectl's context decides",
}


# ---------------------------------------------------------------------------------------------
# Pod pieces
# ---------------------------------------------------------------------------------------------


def pod_security_context() -> dict:
    """Every container as :data:`RUN_AS_USER`, volumes group-owned by it, the runtime's seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities at all."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def writable_env() -> list[dict]:
    """HOME and every cache vLLM, Hugging Face, torch and MLflow write, on the ``cache`` volume.

    With a read-only root filesystem the image's ``/root/.cache`` is out of reach (and not ours:
    the UID is not root); these point every writer at an emptyDir instead.
    """
    return [{"name": "HOME", "value": CACHE_MOUNT}, {"name": "XDG_CACHE_HOME", "value": CACHE_MOUNT},
            {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
            {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_MOUNT}/vllm"},
            {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_MOUNT}/triton"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_MOUNT}/torchinductor"}]


def writable_volumes() -> tuple[list[dict], list[dict]]:
    """The emptyDir volumes for ``/tmp`` and the caches, and their mounts."""
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}, {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_MOUNT}]
    return volumes, mounts


def api_key_env(secret: str) -> dict:
    """``VLLM_API_KEY`` from the Secret (required: without it the pod does not start, rather than start open)."""
    return {"name": keyguard.ENV_KEY,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": keyguard.ENV_KEY, "optional": False}}}


def tracking_env(secret: str) -> tuple[list[dict], list[dict]]:
    """``MLFLOW_TRACKING_URI`` from the Secret's key of that name, and the whole Secret as the environment.

    Both required: a pod without them cannot download a ``models:/`` URI, so it waits in
    ``CreateContainerConfigError`` naming the Secret instead of failing later on a bare URI.
    Other keys of the Secret (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``,
    ``AWS_ACCESS_KEY_ID``, ...) reach the download as they are.

    Returns:
        ``(env, envFrom)`` for the download container.
    """
    env = [{"name": TRACKING_URI_KEY,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": TRACKING_URI_KEY, "optional": False}}}]
    return env, [{"secretRef": {"name": secret, "optional": False}}]


def keyguard_config_map(meta: dict) -> dict:
    """A ConfigMap holding ``qloraflow_keyguard.py``, mounted on vLLM's PYTHONPATH (the image has no qloraflow)."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {**copy.deepcopy(meta), "name": keyguard_name(meta["name"])},
            "data": {f"{keyguard.MODULE}.py": keyguard.module_source()}}


def keyguard_name(name: str) -> str:
    return f"{name}-keyguard"


def keyguard_digest() -> str:
    """Goes into a pod-template annotation: a new middleware rolls the pods, as a new model does."""
    return hashlib.sha256(keyguard.module_source().encode()).hexdigest()


def keyguard_mount(name: str) -> tuple[dict, dict]:
    """The ConfigMap's volume and its read-only mount."""
    return ({"name": "keyguard", "configMap": {"name": keyguard_name(name), "defaultMode": 0o444}},
            {"name": "keyguard", "mountPath": KEYGUARD_MOUNT, "readOnly": True})


def network_policy(meta: dict, selector: dict, port: int, namespace_labels: Optional[dict],
                   pod_labels: Optional[dict]) -> dict:
    """Ingress to the vLLM pods only from the declared clients, only on the serving port.

    Args:
        meta: The objects' metadata (name, labels, namespace).
        selector: Labels of the vLLM pods.
        port: Serving port.
        namespace_labels: Namespaces the clients may be in (None: the policy's own namespace only).
        pod_labels: Labels of the client pods (None: every pod of those namespaces).

    Raises:
        ConfigError: neither is given: that would admit every pod of the cluster, not a declared ingress.
    """
    if namespace_labels is None and pod_labels is None:
        raise ConfigError("deploy", ["ingress_namespace_labels and ingress_pod_labels are both None: declare "
                                     f"the clients (default pod labels {DEFAULT_CLIENT_LABELS})"])
    peer = {}
    if namespace_labels is not None:
        peer["namespaceSelector"] = {"matchLabels": dict(namespace_labels)}
    if pod_labels is not None:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": copy.deepcopy(meta),
            # Ingress only: the download needs egress to MLflow and the object store, wherever they are.
            "spec": {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [peer], "ports": [{"protocol": "TCP", "port": port}]}]}}


def parse_labels(pairs: Optional[Sequence[str]], flag: str) -> Optional[dict]:
    """``["k=v", ...]`` from the command line -> ``{"k": "v"}``; None when the flag was not given.

    Raises:
        ConfigError: a pair without ``=``.
    """
    if pairs is None:
        return None
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError("qloraflow deploy", [f"{flag} {p!r} is not LABEL=VALUE" for p in bad])
    return dict(p.split("=", 1) for p in pairs)


# ---------------------------------------------------------------------------------------------
# Policy linter (checkov)
# ---------------------------------------------------------------------------------------------


def find_checkov() -> Optional[str]:
    """checkov's command: ``$QLORAFLOW_CHECKOV``, else on PATH, else the checkout's ``.venv-lint`` (make setup-lint)."""
    if os.environ.get("QLORAFLOW_CHECKOV"):
        return os.environ["QLORAFLOW_CHECKOV"]
    local = Path(__file__).resolve().parent.parent / ".venv-lint" / "bin" / "checkov"
    return shutil.which("checkov") or (str(local) if local.is_file() else None)


def linted_objects(manifests: list[dict]) -> list[dict]:
    """The manifests as checkov reads them: an InferenceService becomes a Pod of its predictor.

    checkov knows no KServe kinds; its predictor *is* a PodSpec (plus KServe's fields), so the
    same policies apply to it as to the Deployment's pod template.
    """
    out = []
    for m in manifests:
        if m.get("kind") != "InferenceService":
            out.append(m)
            continue
        predictor = m["spec"]["predictor"]
        kserve_only = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
                       "canaryTrafficPercent", "labels", "annotations", "deploymentStrategy", "model", "huggingface"}
        meta = {"name": m["metadata"]["name"], "labels": dict(predictor.get("labels", {})),
                **({"namespace": m["metadata"]["namespace"]} if "namespace" in m["metadata"] else {})}
        out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                    "spec": {k: v for k, v in predictor.items() if k not in kserve_only}})
    return out


def lint_manifests(manifests: list[dict], accepted: Optional[dict[str, str]] = None,
                   checkov: Optional[str] = None) -> list[str]:
    """Run checkov's Kubernetes policies (offline) on one set of manifests; the failed checks, one line each.

    Args:
        manifests: As ``render_manifests`` returns them, checked together: the NetworkPolicy check
            (``CKV2_K8S_6``) looks for a policy selecting each pod.
        accepted: Check id -> reason, skipped. None: :data:`ACCEPTED_CHECKS`.
        checkov: The command; None: :func:`find_checkov`.

    Returns:
        ``"CKV_K8S_20 Containers should not run with allowPrivilegeEscalation: Deployment.default.x"``
        per failure; empty when every policy passes.

    Raises:
        FileNotFoundError: no checkov (``make setup-lint`` installs it).
        RuntimeError: checkov could not run (its output in the message).
    """
    return lint_manifest_sets({"manifests": manifests}, accepted, checkov)["manifests"]


def lint_manifest_sets(sets: dict[str, list[dict]], accepted: Optional[dict[str, str]] = None,
                       checkov: Optional[str] = None, timeout_s: float = 300.0) -> dict[str, list[str]]:
    """:func:`lint_manifests` for several sets in one checkov run (its start-up is most of the time).

    The sets share checkov's graph: give their objects distinct names and selectors.

    Returns:
        Set name -> failed checks.
    """
    checkov = checkov or find_checkov()
    if not checkov:
        raise FileNotFoundError("checkov not found: run `make setup-lint` (it builds .venv-lint) or set QLORAFLOW_CHECKOV")
    accepted = ACCEPTED_CHECKS if accepted is None else accepted
    with tempfile.TemporaryDirectory(prefix="qloraflow-lint-") as tmp:
        files = [Path(tmp) / f"{name}.yaml" for name in sets]
        for path, manifests in zip(files, sets.values()):
            path.write_text(yaml.safe_dump_all(linted_objects(manifests), sort_keys=False))
        # Files, not --directory: checkov skips folders under a dot-folder (.cache/tmp, where make puts TMPDIR).
        cmd = [checkov, "--file", *map(str, files), "--framework", "kubernetes", "--output", "json", "--quiet",
               "--compact", "--skip-download", *(["--skip-check", ",".join(accepted)] if accepted else [])]
        # Offline: no policy metadata download (it would only time out here and in CI).
        env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=tmp)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"checkov ({checkov}) gave no JSON report (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}") from None
    reports = report if isinstance(report, list) else [report]
    if not any(r.get("check_type") == "kubernetes" for r in reports):  # a summary only: nothing was parsed
        raise RuntimeError(f"checkov ({checkov}) checked no Kubernetes object: {proc.stdout[-2000:]}")
    out: dict[str, list[str]] = {name: [] for name in sets}
    for r in reports:
        for c in (r.get("results") or {}).get("failed_checks", []):
            out[Path(c["file_path"]).stem].append(f"{c['check_id']} {c['check_name']}: {c['resource']}")
    return {name: sorted(lines) for name, lines in out.items()}
