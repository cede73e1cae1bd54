"""The Kubernetes manifests: each overlay renders with kustomize and validates, strictly, against
the OpenAPI schemas of one Kubernetes version (kubernetes-validate, offline); the security,
probe, drain and GPU properties hold in the rendered output."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# kubernetes-validate ships schemas for 1.25 to 1.37; validate against a version still widely
# run in production (and the oldest we promise to support).
K8S_VERSION = "1.30.0"
DRAIN_SECONDS = 20  # MLSERVE_DRAIN_SECONDS default
API_UID = 1034  # the bento image's `bentoml` user
WRITABLE = {
    "/tmp",
    "/home/bentoml/bento/logs",
    "/home/bentoml/bentos",
    "/home/bentoml/models",
    "/home/bentoml/envs",
    "/home/bentoml/tmp",
    "/home/bentoml/prometheus_multiproc_dir",
}


def _kustomize() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    message = "neither kustomize nor kubectl is installed (run_tests.sh installs one)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


_RENDERED: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _RENDERED:
        out = subprocess.run(
            [*_kustomize(), str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return copy.deepcopy(_RENDERED[overlay])


def find(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {[d['kind'] for d in docs]}")


def api_container(docs: list[dict]) -> dict:
    (container,) = find(docs, "Deployment", "mlserve-api")["spec"]["template"]["spec"]["containers"]
    return container


def api_config(docs: list[dict]) -> dict[str, str]:
    name = api_container(docs)["envFrom"][0]["configMapRef"]["name"]
    return find(docs, "ConfigMap", name)["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_strictly(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted(
        {
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Namespace",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
        }
    )
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The Secret is created by the operator, never rendered.
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_the_validator_is_strict() -> None:
    """A misspelt field and a wrong type are refused, so the test above proves something."""
    import kubernetes_validate

    docs = render("cpu")
    bad = find(docs, "Deployment", "mlserve-api")
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = find(docs, "HorizontalPodAutoscaler", "mlserve-api")
    bad["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_secret_example_validates_and_has_every_referenced_key() -> None:
    import kubernetes_validate

    secret = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    resources = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert "secret.example.yaml" not in resources
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in api_container(render("cpu"))["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == {"MLSERVE_ADMIN_TOKEN", "MLSERVE_API_KEYS", "MLSERVE_REDIS_URL"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    docs = render(overlay)
    for name, uid in (("mlserve-api", API_UID), ("redis", 999)):
        pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
            assert not sc.get("privileged", False)
            res = container["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], (name, key)
            # Every writable place is an emptyDir or a claim, none is the image.
            volumes = {v["name"]: v for v in pod["volumes"]}
            for mount in container["volumeMounts"]:
                vol = volumes[mount["name"]]
                assert {"emptyDir", "persistentVolumeClaim", "configMap"} & set(vol)
    mounts = {m["mountPath"] for m in api_container(docs)["volumeMounts"]}
    assert mounts >= WRITABLE
    # The bento (code and models) lives in /home/bentoml/bento: it must not be hidden.
    assert "/home/bentoml" not in mounts and "/home/bentoml/bento" not in mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_drain(overlay: str) -> None:
    docs = render(overlay)
    pod = find(docs, "Deployment", "mlserve-api")["spec"]["template"]["spec"]
    container = api_container(docs)
    assert container["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] in ("/ready", "/health")
    # Model loading and warm-up get minutes, not the liveness probe's seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 3000)
    drain = int(api_config(docs).get("MLSERVE_DRAIN_SECONDS", DRAIN_SECONDS))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain


def test_settings_come_from_the_config_file_the_configmap_and_the_secret(tmp_path) -> None:
    from mlserve.settings import Settings

    known = {f"MLSERVE_{name.upper()}" for name in Settings.model_fields}
    shipped = (ROOT / "deploy" / "config" / "config.yaml").read_text()
    for overlay in OVERLAYS:
        docs = render(overlay)
        config = api_config(docs)
        unknown = {k for k in config if k.startswith("MLSERVE_")} - known
        assert not unknown, f"{overlay}: {unknown} are not settings"
        assert config["MLSERVE_HOST"] == "0.0.0.0"
        # No secret in the ConfigMaps.
        assert not {"MLSERVE_ADMIN_TOKEN", "MLSERVE_API_KEYS", "MLSERVE_REDIS_URL"} & set(config)
        # The settings file is deploy/config/config.yaml, mounted where MLSERVE_CONFIG_FILE says.
        container = api_container(docs)
        pod = find(docs, "Deployment", "mlserve-api")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "config-file")
        file_map = find(docs, "ConfigMap", volume["configMap"]["name"])
        assert file_map["data"]["config.yaml"] == shipped
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config-file")
        assert config["MLSERVE_CONFIG_FILE"] == f"{mount['mountPath']}/config.yaml"
        assert mount["readOnly"] is True
        # What the pod runs is a valid configuration: the file under the pod's variables and
        # stand-ins for its secrets, through the settings' own validators.
        (tmp_path / "config.yaml").write_text(file_map["data"]["config.yaml"])
        env = {k: v for k, v in config.items() if k in known}
        env["MLSERVE_CONFIG_FILE"] = str(tmp_path / "config.yaml")
        settings = Settings(
            _env_file=None,
            **{k.removeprefix("MLSERVE_").lower(): v for k, v in env.items()},
            admin_token="a-stand-in-admin-token",
            redis_url="redis://redis:6379/0",
        )
        assert settings.control_backend == "redis" and settings.control_namespace != "default"
        # Workers are set explicitly: "auto" would count the node's cores, not the pod's.
        workers = int(config["MLSERVE_WORKERS"])
        assert 1 <= workers <= int(api_container(docs)["resources"]["limits"]["cpu"])
    parsed = yaml.safe_load(shipped)
    assert "token" not in parsed["admin"] and "api_keys" not in parsed["http"]
    assert "redis_url" not in parsed["cache"]  # secrets come from the Secret only


def test_gpu_overlay() -> None:
    docs = render("gpu")
    container = api_container(docs)
    assert container["image"] == "localhost/mlserve:gpu"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = api_config(docs)
    assert config["MLSERVE_WORKERS"] == "1"
    assert config["MLSERVE_DEVICE"] == "cuda"
    pod = find(docs, "Deployment", "mlserve-api")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_cpu_overlay() -> None:
    docs = render("cpu")
    container = api_container(docs)
    assert container["image"] in ("localhost/mlserve:full", "localhost/mlserve:slim")
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    pod = find(docs, "Deployment", "mlserve-api")["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert api_config(docs)["MLSERVE_DEVICE"] == "cpu"


def test_service_hpa_and_pdb_target_the_api() -> None:
    docs = render("cpu")
    deployment = find(docs, "Deployment", "mlserve-api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find(docs, "Service", "mlserve-api")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == 3000
    pdb = find(docs, "PodDisruptionBudget", "mlserve-api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = find(docs, "HorizontalPodAutoscaler", "mlserve-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "mlserve-api"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # A voluntary disruption always leaves a replica serving.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_network_policies() -> None:
    docs = render("cpu")
    api_labels = find(docs, "Deployment", "mlserve-api")["spec"]["template"]["metadata"]["labels"]
    api = find(docs, "NetworkPolicy", "mlserve-api")
    assert api["spec"]["policyTypes"] == ["Ingress"]
    assert api["spec"]["podSelector"]["matchLabels"].items() <= api_labels.items()
    for rule in api["spec"]["ingress"]:
        assert rule["ports"] == [{"port": 3000, "protocol": "TCP"}]
        # Only whole namespaces by name (the ingress controller's, the monitoring one).
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}
    sources = [
        p["namespaceSelector"]["matchLabels"] for r in api["spec"]["ingress"] for p in r["from"]
    ]
    assert {"kubernetes.io/metadata.name": "ingress-nginx"} in sources
    redis = find(docs, "NetworkPolicy", "redis")
    redis_labels = find(docs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    assert redis["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    ((rule),) = redis["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": api["spec"]["podSelector"]["matchLabels"]}}
    ]


REDIS_UNITS = {
    "": 1,
    "k": 1000,
    "kb": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
}
K8S_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _bytes(quantity: str, units: dict[str, int]) -> int:
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", quantity).groups()
    return int(number) * units[unit if units is K8S_UNITS else unit.lower()]


def test_redis_runs_the_shared_config_within_its_memory_limit() -> None:
    docs = render("cpu")
    conf_text = (ROOT / "deploy" / "redis" / "redis.conf").read_text()
    redis = find(docs, "Deployment", "redis")
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["redis-server", "/etc/redis/redis.conf"]
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    config_map = find(docs, "ConfigMap", config_volume["configMap"]["name"])
    assert config_map["data"]["redis.conf"] == conf_text
    conf = dict(
        line.split(None, 1)
        for line in conf_text.splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert conf["maxmemory-policy"] == "volatile-lru"
    assert conf["appendonly"] == "yes"
    limit = _bytes(container["resources"]["limits"]["memory"], K8S_UNITS)
    assert _bytes(conf["maxmemory"], REDIS_UNITS) < limit
    assert redis["spec"]["strategy"]["type"] == "Recreate"
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    find(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
