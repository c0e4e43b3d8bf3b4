"""Settings validation, the server's entry points and the real `accel serve` process: start-up, bad settings,
SIGTERM drain."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.settings import SettingsError, load_settings
from server_fixtures import ACCEL, ServeProcess



@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"queue_size": 0}, "queue_size"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"port": 70000}, "port"),
        ({"models": []}, "models"),
        ({"models": [{"id": "a", "source": "tiny-flux"}, {"id": "a", "source": "tiny-wan"}]}, "unique"),
        ({"models": [{"id": "a", "source": "tiny-flux", "default_preset": "warp"}]}, "warp"),
        ({"models": [{"id": "bad id!", "source": "tiny-flux"}]}, "models.0.id"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(**overrides)


def test_settings_from_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCEL_QUEUE_SIZE", "7")
    assert load_settings().queue_size == 7
    monkeypatch.setenv("ACCEL_MAX_BATCH_SIZE", "many")
    with pytest.raises(SettingsError, match="max_batch_size"):
        load_settings()
    monkeypatch.delenv("ACCEL_MAX_BATCH_SIZE")
    config = tmp_path / "server.yaml"
    config.write_text("queue_size: 3\nmodels:\n  - id: flux\n    source: tiny-flux\n    default_preset: fast\n")
    settings = load_settings(config)
    assert settings.queue_size == 3 and settings.models[0].default_preset == "fast"
    toml = tmp_path / "server.toml"
    toml.write_text('max_batch_size = 2\n[[models]]\nid = "wan"\nsource = "tiny-wan"\n')
    assert load_settings(toml).models[0].id == "wan"
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")


@pytest.mark.parametrize("command", [[sys.executable, "-m", "server"], [str(Path(ACCEL).with_name("accel-server"))],
                                     [ACCEL, "serve"]])
def test_server_entry_points_run(command):
    """The server's own entry points (`python -m server`, `accel-server`) and `accel serve`, which forwards to them."""
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--port" in result.stdout


def test_serve_refuses_bad_settings_with_a_message(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("queue_size: -1\n")
    result = subprocess.run([ACCEL, "serve", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "queue_size" in result.stderr and "Traceback" not in result.stderr


def test_serve_process_drains_in_flight_work_on_sigterm():
    server = ServeProcess(shutdown_grace_s="60")
    try:
        server.wait_ready()
        result = {}

        def slow_request():
            body = {"prompt": "x", "size": "64x64", "num_inference_steps": 60, "seed": 1}
            result["response"] = httpx.post(server.url + "/v1/images/generations", json=body, timeout=120)

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)  # the request is in flight
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert result["response"].status_code == 200  # finished, not dropped
        # a clean shutdown after the drain: exit status 0, not death by the signal
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.process.stdout.read()
    finally:
        if server.process.poll() is None:
            server.process.kill()
