"""Offline validation of the shipped deployment files: schemas, and the properties reliability depends on."""

from __future__ import annotations

import configparser
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SOFT_SHUTDOWN_S = 60  # FLEETFETCH_SOFT_SHUTDOWN_TIMEOUT in the shipped configurations


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def seconds(value: str) -> int:
    return int(value.rstrip("s"))


def test_compose_file_matches_the_compose_specification():
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_redis_is_persistent_and_never_evicts():
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command and "--requirepass" in command
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose()["volumes"]
    assert redis["healthcheck"]["test"]


def test_compose_workers_scale_stop_gracefully_and_flower_is_locked_down():
    services = compose()["services"]
    worker, flower, producer = services["worker"], services["flower"], services["producer"]
    assert isinstance(worker["command"], list) and worker["command"][:3] == ["celery", "-A", "tasks"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    assert seconds(worker["stop_grace_period"]) > SOFT_SHUTDOWN_S
    assert worker["environment"]["FLEETFETCH_SOFT_SHUTDOWN_TIMEOUT"] == str(SOFT_SHUTDOWN_S)
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])
    env_example = (ROOT / "deploy" / "compose.env.example").read_text()
    assert "FLOWER_BASIC_AUTH=" in env_example and "REDIS_PASSWORD=" in env_example
    assert producer["profiles"] == ["tools"] and producer["entrypoint"] == ["fleetfetch"]
    assert not any(s.get("privileged") for s in services.values())


def test_dockerfile_is_slim_multistage_non_root_exec_form():
    text = (ROOT / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) == 2 and all("-slim" in f for f in froms)
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    cmd = [line for line in text.splitlines() if line.startswith("CMD ")][-1]
    assert cmd.startswith('CMD ["celery"')
    hadolint = BIN / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def render_kustomization() -> list[dict]:
    """`kubectl kustomize` when installed; else the subset of kustomize this kustomization uses."""
    base = ROOT / "deploy" / "k8s"
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    spec = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = [d for r in spec["resources"] for d in yaml.safe_load_all((base / r).read_text()) if d]
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = spec["namespace"]
    return docs


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_manifests_build_and_validate_strictly(tmp_path):
    docs = render_kustomization()
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(rendered)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service", "Secret", "NetworkPolicy",
                                         "PersistentVolumeClaim", "ScaledObject", "TriggerAuthentication"}


def test_keda_scales_the_worker_deployment_on_the_queue_length():
    docs = render_kustomization()
    scaled = by_kind(docs, "ScaledObject", "fleetfetch-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind(docs, "Deployment", "fleetfetch-worker")["metadata"][
        "name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "fleetfetch"
    auth = by_kind(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"][0]["name"] == "fleetfetch-redis"


def test_kubernetes_workers_are_hardened_and_stop_gracefully():
    docs = render_kustomization()
    pod = by_kind(docs, "Deployment", "fleetfetch-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > SOFT_SHUTDOWN_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["livenessProbe"] and container["readinessProbe"] and container["resources"]["limits"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == [
        "ALL"]
    pvc = by_kind(docs, "PersistentVolumeClaim", "fleetfetch-downloads")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    redis_conf = by_kind(docs, "ConfigMap", "redis-config")["data"]["redis.conf"]
    for line in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        assert line in redis_conf
    assert by_kind(docs, "StatefulSet", "redis")["spec"]["volumeClaimTemplates"]


def test_network_policy_keeps_workers_off_metadata_and_internal_ranges():
    policy = by_kind(render_kustomization(), "NetworkPolicy", "fleetfetch-worker-egress")
    blocks = [to["ipBlock"] for rule in policy["spec"]["egress"] for to in rule["to"] if "ipBlock" in to]
    assert blocks and blocks[0]["cidr"] == "0.0.0.0/0"
    excepted = [ipaddress.ip_network(n) for n in blocks[0]["except"]]
    assert any(n.is_link_local for n in excepted)  # the cloud metadata address lives there
    assert sum(n.is_private and not n.is_loopback and not n.is_link_local for n in excepted) >= 3
    assert any(n.is_loopback for n in excepted)


def test_systemd_units_stop_gracefully_and_are_sandboxed():
    for unit in ("fleetfetch-worker.service", "fleetfetch-flower.service"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(ROOT / "deploy" / "systemd" / unit)
        service = parser["Service"]
        assert service["EnvironmentFile"] == "/etc/fleetfetch/fleetfetch.env"
        assert service["KillSignal"] == "SIGTERM" and service["NoNewPrivileges"] == "yes"
        assert service["ProtectSystem"] == "strict" and service["User"] == "fleetfetch"
        if unit.startswith("fleetfetch-worker"):
            assert int(service["TimeoutStopSec"]) > SOFT_SHUTDOWN_S
            assert "ReadWritePaths" in service
