"""Offline validation of the shipped deployment files: schemas, and the properties reliability depends on."""

from __future__ import annotations

import base64
import configparser
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)

BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
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
    assert worker["command"] == ["python", "-m", "tasks.worker", "--per-core"]  # the whole host in one command
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    assert seconds(worker["stop_grace_period"]) > SOFT_SHUTDOWN_S
    assert worker["environment"]["FLEETFETCH_SOFT_SHUTDOWN_TIMEOUT"] == str(SOFT_SHUTDOWN_S)
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])
    env_example = (ROOT / "deploy" / "compose.env.example").read_text()
    assert "FLOWER_BASIC_AUTH=" in env_example and "REDIS_PASSWORD=" in env_example
    assert producer["profiles"] == ["tools"] and producer["entrypoint"][-1] == "fleetfetch"
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


class RenderError(Exception):
    """kustomize refused to build a kustomization (a missing generator file, say)."""


def render_kustomization(base: Path) -> list[dict]:
    """`kubectl kustomize` when installed; else the subset of kustomize these kustomizations use."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RenderError(out.stderr)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    spec = yaml.safe_load((base / "kustomization.yaml").read_text())
    try:
        docs = [d for r in spec["resources"] for d in yaml.safe_load_all((base / r).read_text()) if d]
        for gen in spec.get("secretGenerator", []):
            pairs = [line.partition("=") for env in gen["envs"] for line in (base / env).read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
            docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]},
                         "type": gen.get("type", "Opaque"),
                         "data": {k.strip(): base64.b64encode(v.encode()).decode() for k, _, v in pairs}})
        for gen in spec.get("configMapGenerator", []):
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                         "data": {Path(f).name: (base / f).read_text() for f in gen["files"]}})
    except FileNotFoundError as exc:
        raise RenderError(str(exc)) from None
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = spec["namespace"]
    return docs


REDIS_PASSWORD = secrets.token_hex(24)
FLOWER_LOGIN = f"admin:{secrets.token_hex(12)}"


def operator_tree(dest: Path) -> Path:
    """deploy/k8s as an operator has it before applying: secrets.env and the producer's urls.txt written."""
    shutil.copytree(K8S, dest)
    (dest / "secrets.env").write_text(f"redis-password={REDIS_PASSWORD}\nflower-basic-auth={FLOWER_LOGIN}\n")
    (dest / "producer" / "urls.txt").write_text("http://127.0.0.1:8000/a.bin\n")
    return dest


@pytest.fixture(scope="module")
def operator_k8s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return operator_tree(tmp_path_factory.mktemp("deploy") / "k8s")


@pytest.fixture(scope="module")
def docs(operator_k8s: Path) -> list[dict]:
    return render_kustomization(operator_k8s)


@pytest.fixture(scope="module")
def producer_docs(operator_k8s: Path) -> list[dict]:
    return render_kustomization(operator_k8s / "producer")


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def secret_data(docs: list[dict], name: str) -> dict[str, str]:
    secret = by_kind(docs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()} | secret.get(
        "stringData", {})


def container(docs: list[dict], kind: str, name: str) -> dict:
    return by_kind(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def test_kubernetes_manifests_build_and_validate_strictly(tmp_path, docs, producer_docs):
    core = [d for d in docs + producer_docs if not d["apiVersion"].startswith("keda.sh/")]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(rendered)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service", "Secret", "NetworkPolicy",
                                         "PersistentVolumeClaim", "ScaledObject", "TriggerAuthentication",
                                         "PodDisruptionBudget"}
    assert {d["kind"] for d in producer_docs} == {"Job", "ConfigMap"}


def test_keda_scales_the_worker_deployment_on_the_queue_length(docs):
    scaled = by_kind(docs, "ScaledObject", "fleetfetch-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind(docs, "Deployment", "fleetfetch-worker")["metadata"][
        "name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "fleetfetch"
    auth = by_kind(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    ref = auth["spec"]["secretTargetRef"][0]
    assert ref["key"] in secret_data(docs, ref["name"])


def test_kubernetes_workers_are_hardened_and_stop_gracefully(docs):
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


def test_network_policy_keeps_workers_off_metadata_and_internal_ranges(docs):
    policy = by_kind(docs, "NetworkPolicy", "fleetfetch-worker-egress")
    blocks = [to["ipBlock"] for rule in policy["spec"]["egress"] for to in rule["to"] if "ipBlock" in to]
    assert blocks and blocks[0]["cidr"] == "0.0.0.0/0"
    excepted = [ipaddress.ip_network(n) for n in blocks[0]["except"]]
    assert any(n.is_link_local for n in excepted)  # the cloud metadata address lives there
    assert sum(n.is_private and not n.is_loopback and not n.is_link_local for n in excepted) >= 3
    assert any(n.is_loopback for n in excepted)


def test_systemd_units_stop_gracefully_and_are_sandboxed():
    for unit in ("fleetfetch-worker@.service", "fleetfetch-workers.service", "fleetfetch-flower.service"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(ROOT / "deploy" / "systemd" / unit)
        service = parser["Service"]
        assert service["EnvironmentFile"] == "/etc/fleetfetch/fleetfetch.env"
        assert service["KillSignal"] == "SIGTERM" and service["NoNewPrivileges"] == "yes"
        assert service["ProtectSystem"] == "strict" and service["User"] == "fleetfetch"
        if unit == "fleetfetch-worker@.service":
            assert int(service["TimeoutStopSec"]) > SOFT_SHUTDOWN_S
            assert "ReadWritePaths" in service
            assert service["ExecStart"].endswith("-n worker%i@%H")  # one instance per core, each its own name
        if unit == "fleetfetch-workers.service":
            assert int(service["TimeoutStopSec"]) > SOFT_SHUTDOWN_S and "ReadWritePaths" in service
            assert service["ExecStart"] == "/opt/fleetfetch/bin/python -m tasks.worker --per-core"  # the machine


# --- Probes: alive means the process beats; neither probe starts Python or depends on `celery inspect` ---

def run_probe(command: list[str], heartbeat: Path) -> int:
    """Run a probe's argv exactly as the kubelet or Docker would, with the worker's FLEETFETCH_HEARTBEAT_FILE."""
    env = {"PATH": os.environ["PATH"], "FLEETFETCH_HEARTBEAT_FILE": str(heartbeat)}
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def compose_shell(test: list[str]) -> list[str]:
    """A compose CMD-SHELL healthcheck as the argv Docker runs (compose turns `$$` into `$`)."""
    assert test[0] == "CMD-SHELL"
    return ["/bin/sh", "-c", test[1].replace("$$", "$")]


def worker_probes(docs: list[dict]) -> dict[str, list[str]]:
    worker = container(docs, "Deployment", "fleetfetch-worker")
    probes = {"liveness": worker["livenessProbe"]["exec"]["command"],
              "readiness": worker["readinessProbe"]["exec"]["command"],
              "compose": compose_shell(compose()["services"]["worker"]["healthcheck"]["test"])}
    return probes


def test_worker_probes_start_no_python_and_never_ask_the_broker(docs):
    worker = container(docs, "Deployment", "fleetfetch-worker")
    for name, command in worker_probes(docs).items():
        text = " ".join(command)
        assert command[0] in ("sh", "/bin/sh"), name
        for word in ("celery", "python", "inspect", "ping", "redis"):
            assert word not in text, f"{name} probe runs {word}: {text}"
    env = {e["name"]: e.get("value") for e in worker["env"]}
    heartbeat = env["FLEETFETCH_HEARTBEAT_FILE"]
    mounts = [m["mountPath"] for m in worker["volumeMounts"]]
    assert any(heartbeat.startswith(m + "/") for m in mounts)  # writable under readOnlyRootFilesystem
    assert compose()["services"]["worker"]["environment"]["FLEETFETCH_HEARTBEAT_FILE"] == heartbeat
    assert "FLEETFETCH_HEARTBEAT_FILE=" + heartbeat in (ROOT / "Dockerfile").read_text()


def test_liveness_passes_on_a_fresh_heartbeat_and_fails_on_a_stale_or_missing_one(docs, tmp_path):
    heartbeat = tmp_path / "fleetfetch-worker.alive"
    probes = worker_probes(docs)
    for name in ("liveness", "compose"):
        assert run_probe(probes[name], heartbeat) != 0, f"{name}: passes without a heartbeat file"
        heartbeat.touch()
        assert run_probe(probes[name], heartbeat) == 0, f"{name}: fails on a fresh heartbeat"
        stale = time.time() - 120
        os.utime(heartbeat, (stale, stale))
        assert run_probe(probes[name], heartbeat) != 0, f"{name}: passes on a heartbeat 2 minutes old"
        heartbeat.unlink()


def test_readiness_follows_the_ready_marker(docs, tmp_path):
    heartbeat = tmp_path / "fleetfetch-worker.alive"
    heartbeat.touch()
    readiness = worker_probes(docs)["readiness"]
    assert run_probe(readiness, heartbeat) != 0
    (tmp_path / "fleetfetch-worker.alive.ready").touch()
    assert run_probe(readiness, heartbeat) == 0


# --- Drains ---

def test_a_disruption_budget_keeps_a_drain_from_taking_every_worker(docs):
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    worker_labels = by_kind(docs, "Deployment", "fleetfetch-worker")["spec"]["template"]["metadata"]["labels"]
    budget = next(p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= worker_labels.items())
    limit = budget["spec"].get("maxUnavailable")
    assert limit not in (None, 0, "0", "0%", "100%")
    # Unready workers (Redis down) must not block a drain.
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    redis_labels = by_kind(docs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert not any(p["spec"]["selector"]["matchLabels"].items() <= redis_labels.items() for p in pdbs)


# --- Secrets: generated from the operator's file, never shipped ---

def test_no_literal_credentials_in_applied_resources(docs, producer_docs):
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not doc or doc.get("kind") != "Secret", f"{path} ships a Secret"
    text = yaml.safe_dump_all(docs + producer_docs)
    example = (K8S / "secrets.env.example").read_text().splitlines()
    for placeholder in (line.partition("=")[2] for line in example if "=" in line and not line.startswith("#")):
        assert placeholder not in text
    pods = [d["spec"]["template"]["spec"] for d in docs + producer_docs if "template" in d.get("spec", {})]
    for env in (e for pod in pods for c in pod["containers"] for e in c.get("env", [])):
        if re.search("PASSWORD|AUTH|SECRET|TOKEN", env["name"]):
            assert "value" not in env, f"{env['name']} is written in the manifest"
        for password in re.findall(r"://[^:/@]*:([^@]*)@", env.get("value", "")):
            assert password.startswith("$(") and password.endswith(")"), f"{env['name']} holds a password"
    assert secret_data(docs, "fleetfetch-secrets") == {"redis-password": REDIS_PASSWORD,
                                                       "flower-basic-auth": FLOWER_LOGIN}
    # Every secret reference names a key the operator's file has (the example documents them all).
    example_keys = {line.partition("=")[0] for line in (K8S / "secrets.env.example").read_text().splitlines()
                    if line and not line.startswith("#")}
    for doc in docs + producer_docs:
        for ref in re.findall(r"secretKeyRef:\s*\n\s*key: (\S+)\s*\n\s*name: (\S+)", yaml.safe_dump(doc)):
            assert ref[1] == "fleetfetch-secrets" and ref[0] in example_keys, ref
    # The URLs are built from the password in the pod spec, after it.
    worker_env = [e["name"] for e in container(docs, "Deployment", "fleetfetch-worker")["env"]]
    assert worker_env.index("REDIS_PASSWORD") < worker_env.index("CELERY_BROKER_URL")


def test_applying_without_the_secrets_file_fails_loudly(tmp_path):
    base = operator_tree(tmp_path / "k8s")
    (base / "secrets.env").unlink()
    with pytest.raises(RenderError, match="secrets.env"):
        render_kustomization(base)
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "deploy/k8s/secrets.env",
                              "deploy/compose.env", "deploy/k8s/producer/urls.txt"], capture_output=True, text=True)
    assert len(ignored.stdout.split()) == 3, ignored.stdout + ignored.stderr


def guarded_start(script: list[str], variable: str, value: str, stub: str,
                  tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a container's start script with `stub` (what it finally execs) replaced by a recorder on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / stub
    recorder.write_text('#!/bin/sh\necho "started $*"\n')
    recorder.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", variable: value}
    return subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)


def example_value(path: Path, key: str) -> str:
    return next(line.partition("=")[2] for line in path.read_text().splitlines() if line.startswith(key + "="))


def test_redis_and_flower_refuse_the_example_placeholders(docs, tmp_path):
    redis_scripts = [container(docs, "StatefulSet", "redis")["command"],
                     [c.replace("$$", "$") for c in compose()["services"]["redis"]["command"]]]
    flower_scripts = [container(docs, "Deployment", "fleetfetch-flower")["args"],
                      [c.replace("$$", "$") for c in compose()["services"]["flower"]["command"]]]
    examples = [K8S / "secrets.env.example", ROOT / "deploy" / "compose.env.example"]
    placeholders = [example_value(examples[0], "redis-password"), example_value(examples[1], "REDIS_PASSWORD")]
    for script in redis_scripts:
        for bad in [*placeholders, "", "short-but-ok", "a" * 20 + "@/:#"]:
            run = guarded_start(script, "REDIS_PASSWORD", bad, "redis-server", tmp_path)
            assert run.returncode == 1 and "started" not in run.stdout, (bad, run.stdout)
            assert run.stderr.startswith("error: ") and len(run.stderr.splitlines()) == 1, run.stderr
        run = guarded_start(script, "REDIS_PASSWORD", REDIS_PASSWORD, "redis-server", tmp_path)
        assert run.returncode == 0 and f"--requirepass {REDIS_PASSWORD}" in run.stdout, run.stdout + run.stderr
    logins = [example_value(examples[0], "flower-basic-auth"), example_value(examples[1], "FLOWER_BASIC_AUTH")]
    for script in flower_scripts:
        for bad in [*logins, "", "admin:"]:
            run = guarded_start(script, "FLOWER_BASIC_AUTH", bad, "celery", tmp_path)
            assert run.returncode == 1 and run.stderr.startswith("error: "), (bad, run.stdout, run.stderr)
        run = guarded_start(script, "FLOWER_BASIC_AUTH", FLOWER_LOGIN, "celery", tmp_path)
        assert run.returncode == 0 and "started -A tasks flower" in run.stdout, run.stdout + run.stderr


# --- The producer as a Kubernetes Job ---

def test_producer_job_runs_the_cli_on_the_list_from_its_configmap(docs, producer_docs, tmp_path):
    job = by_kind(producer_docs, "Job", "fleetfetch-producer")
    pod = job["spec"]["template"]["spec"]
    producer = pod["containers"][0]
    assert producer["args"][0] == "fleetfetch" and pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0  # a retry would start a second download job
    # The list file is the ConfigMap's key, where the pod mounts it.
    urls_path = Path(producer["args"][1])
    mount = next(m for m in producer["volumeMounts"] if urls_path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = by_kind(producer_docs, "ConfigMap", volume["configMap"]["name"])
    assert urls_path.name in configmap["data"]
    # Redis admits it (the NetworkPolicy names its label), it has the broker URLs, and it runs hardened.
    admitted = by_kind(docs, "NetworkPolicy", "redis-ingress")["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] in admitted["matchExpressions"][
        0]["values"]
    env = [e["name"] for e in producer["env"]]
    assert env.index("REDIS_PASSWORD") < env.index("CELERY_BROKER_URL") and "CELERY_RESULT_BACKEND" in env
    assert pod["securityContext"]["runAsNonRoot"] and producer["securityContext"]["readOnlyRootFilesystem"]
    # Without the operator's list, the build fails instead of running an old one.
    base = operator_tree(tmp_path / "k8s")
    (base / "producer" / "urls.txt").unlink()
    with pytest.raises(RenderError, match="urls.txt"):
        render_kustomization(base / "producer")
    # The arguments are the CLI's own: it parses them (--help after them prints usage, exit 0).
    cli = subprocess.run([sys.executable, "-m", "producer", *producer["args"][1:], "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "usage:" in cli.stdout, cli.stderr


# --- The image: locked dependencies, an init as PID 1 ---

def lock_pins() -> dict[str, tuple[str, int]]:
    """requirements.lock as {name: (version, number of hashes)}."""
    pins: dict[str, tuple[str, int]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            name = canonicalize_name(match[1])
            pins[name] = (match[2], 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            pins[name] = (pins[name][0], pins[name][1] + 1)
    return pins


def test_lock_pins_every_dependency_with_hashes_for_python_3_11():
    pins = lock_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock lacks {name}: regenerate it (deploy/README.md)"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (requirement, pins[name])
    assert all(count > 0 for _, count in pins.values())
    assert "--python-version 3.11" in (ROOT / "requirements.lock").read_text().splitlines()[1]


def test_image_installs_the_lock_and_runs_tini_as_pid_1():
    text = (ROOT / "Dockerfile").read_text()
    runs = [line for line in text.splitlines() if "pip " in line]
    assert any("--require-hashes" in r and "-r requirements.lock" in r for r in runs), runs
    assert any("--no-deps" in r and " ." in r for r in runs)  # the project itself adds no unlocked versions
    assert any("--no-index" in r and "--no-deps" in r for r in runs)  # the runtime stage installs only those
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert all(f.startswith("python:3.11-slim-") for f in froms), froms  # Debian release named, not floating
    assert "tini" in next(line for line in text.splitlines() if "apt-get install" in line)
    entrypoint = [line for line in text.splitlines() if line.startswith("ENTRYPOINT ")][-1]
    assert entrypoint == 'ENTRYPOINT ["/usr/bin/tini", "--"]'
    assert "-g" not in entrypoint  # signals go to celery only, not straight to its pool processes
    # A service that replaces the entrypoint keeps tini in front.
    for name, service in compose()["services"].items():
        if "entrypoint" in service:
            assert service["entrypoint"][:2] == ["/usr/bin/tini", "--"], name


def test_systemd_units_install_from_the_checkout_not_an_unpublished_name():
    for unit in ("fleetfetch-worker@.service", "fleetfetch-workers.service"):
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        assert "pip install fleetfetch" not in text
        assert "requirements.lock" in text and "--no-deps" in text


def test_every_shipped_flower_lists_each_tasks_url_and_result():
    """Flower's default task list shows only names and ids: every shipped Flower adds the (redacted) arguments
    and the result or failure reason, as tests/test_flower.py runs it."""
    from tests.test_flower import TASKS_COLUMNS

    for path in ("docker-compose.yml", "deploy/k8s/flower.yaml", "deploy/systemd/fleetfetch-flower.service",
                 "README.md"):
        text = (ROOT / path).read_text()
        assert TASKS_COLUMNS in text, path
