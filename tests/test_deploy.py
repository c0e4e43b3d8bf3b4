"""Deployment artefacts, checked offline: the Dockerfile (hadolint, and the commands it runs work here), the
Kubernetes manifests (kubernetes-validate against the bundled Kubernetes schemas; CRDs checked by hand) and the
Ray Serve application (started locally on CPU with the tiny model)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -c constraints.txt -e '.[dev]' installs it")
    return path


# -- Docker ------------------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.M)
    assert stages == ["cpu-build", "cpu", "gpu-build", "gpu"]  # gpu is the default (last) target
    assert text.count("HEALTHCHECK") == 2 and text.count("EXPOSE 8000") == 2
    assert all(u != "0" and u != "root" for u in re.findall(r"^USER (\S+)", text, re.M))
    assert '".[server,gpu,redis]"' in text and "HF_HOME=/models/hf" in text and 'VOLUME ["/models"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_dockerfile_commands_work_here():
    """ENTRYPOINT `accel-server` and the HEALTHCHECK script, outside Docker, against a live server."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^ENTRYPOINT (.+)$", text, re.M) == ['["accel-server"]'] * 2
    help_text = subprocess.run([str(BIN / "accel-server"), "--help"], capture_output=True, text=True, check=True)
    assert "--port" in help_text.stdout
    for path in re.findall(r"^COPY (?:--from=\S+ )?(\S+) ", text, re.M):
        if not path.startswith("/"):
            assert (ROOT / path.rstrip("/")).exists(), path
    from server_fixtures import LiveServer

    check = ROOT / "deploy" / "healthcheck.py"
    with LiveServer(models=[{"id": "tiny-flux", "source": "tiny-flux"}], warmup=False) as live:
        ok = subprocess.run([sys.executable, str(check)], env={**os.environ, "ACCEL_PORT": str(live.settings.port)})
        assert ok.returncode == 0
    down = subprocess.run([sys.executable, str(check), f"http://127.0.0.1:{live.settings.port}/health"],
                          capture_output=True, text=True)
    assert down.returncode == 1 and "unhealthy" in down.stderr


# -- Kubernetes ----------------------------------------------------------------------------------------------------
def _docs():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [(name, d) for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_manifests_validate_against_kubernetes_schemas():
    """Core kinds against the schemas kubernetes-validate bundles (strict: unknown fields fail). It has no schemas
    for CRDs (KEDA ScaledObject, Prometheus Operator PodMonitor) or the Kustomization: those are checked below."""
    import kubernetes_validate

    for name, doc in _docs():
        if doc["apiVersion"] in ("keda.sh/v1alpha1", "monitoring.coreos.com/v1"):
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises ValidationError naming the field


def test_manifests_wire_up():
    docs = {d["kind"]: d for _, d in _docs() if d["kind"] != "Service"}
    deployment = next(d for _, d in _docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "accel")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    settings = docs["ConfigMap"]["data"]
    assert pod["terminationGracePeriodSeconds"] >= float(settings["ACCEL_SHUTDOWN_GRACE_S"])
    assert {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}} in container["envFrom"]
    assert {"secretRef": {"name": docs["Secret"]["metadata"]["name"]}} in container["envFrom"]
    assert any(v["mountPath"] == "/models" for v in container["volumeMounts"])
    from server.settings import load_settings

    env = {k.removeprefix("ACCEL_").lower(): v for k, v in settings.items() if k.startswith("ACCEL_")}
    env["models"] = yaml.safe_load(env["models"])
    assert load_settings(**env).job_store == "redis"  # the ConfigMap is a valid server configuration
    trigger = docs["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and "accel_queue_depth" in trigger["metadata"]["query"]
    assert docs["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == "accel"
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    from server.metrics import Metrics

    assert "accel_queue_depth" in [m.name for m in Metrics().registry.collect()]


# -- Ray Serve -----------------------------------------------------------------------------------------------------
RAY_SMOKE = """
import os, time, httpx
import ray
from ray import serve
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PORT"])})
from deploy.ray.app import app
serve.run(app, route_prefix="/")
url = "http://127.0.0.1:" + os.environ["PORT"]
for _ in range(600):
    try:
        if httpx.get(url + "/ready", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
r = httpx.post(url + "/v1/images/generations", timeout=120,
               json={"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "seed": 1})
print("STATUS", r.status_code, len(r.json()["data"][0]["b64_json"]) if r.status_code == 200 else r.text)
serve.shutdown()
ray.shutdown()
"""


def test_ray_serve_app_serves_an_image_on_cpu(tmp_path):
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")
    from server_fixtures import free_port

    env = {**os.environ, "PORT": str(free_port()), "RAY_ACCEL_NUM_GPUS": "0", "ACCEL_WARMUP": "false",
           "ACCEL_MODELS": '[{"id": "tiny-flux", "source": "tiny-flux"}]', "RAY_ACCEL_MAX_REPLICAS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", RAY_SMOKE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "STATUS 200" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


# -- per-family server configs ----------------------------------------------------------------------------------
def test_every_family_has_a_server_config_that_loads():
    """deploy/models/<family>.yaml: one per adapter family, each a valid server config (the settings model rejects
    unknown keys and bad values) naming at least one model with a dtype and a preset that exists."""
    from accel.adapters import ADAPTERS
    from accel.presets import PRESETS
    from server.settings import load_settings

    configs = {path.stem: path for path in (ROOT / "deploy" / "models").glob("*.yaml")}
    assert set(ADAPTERS) <= set(configs), f"families without deploy/models/<family>.yaml: {set(ADAPTERS) - set(configs)}"
    for family, path in configs.items():
        settings = load_settings(path)
        assert settings.models, path
        for model in settings.models:
            assert model.dtype in ("bfloat16", "float16") and model.default_preset in PRESETS, (path, model)
            assert "/" in model.source and not model.source.startswith("/"), (path, model.source)  # hub ids
