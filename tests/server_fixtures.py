"""A real uvicorn server in a background thread, for tests over HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from server.app import create_app
from server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, timeout: float, probe_timeout: float, check=lambda: None) -> bool:
    """Poll ``url``/ready until it answers 200 (True) or ``timeout`` seconds pass (False); ``check`` runs before
    each probe and may raise (e.g. when the server process has exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        check()
        try:
            if httpx.get(url + "/ready", timeout=probe_timeout).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


class LiveServer:
    def __init__(self, **settings):
        settings.setdefault("models", [{"id": "tiny-flux", "source": "tiny-flux"}, {"id": "tiny-wan", "source": "tiny-wan"}])
        self.settings = ServerSettings(port=free_port(), **settings)
        self.app = create_app(self.settings)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.accel

    def __enter__(self):
        self.thread.start()
        if not wait_until_ready(self.url, 180, probe_timeout=2):
            raise RuntimeError("server did not become ready")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


ACCEL = str(Path(sys.executable).with_name("accel"))


class ServeProcess:
    """`accel serve` as a real process on a free port; settings as keyword arguments become ACCEL_* variables."""

    def __init__(self, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ACCEL_WARMUP": "false", "ACCEL_LOG_LEVEL": "warning", "OMP_WAIT_POLICY": "PASSIVE"}
        for name, value in settings.items():
            env["ACCEL_" + name.upper()] = value if isinstance(value, str) else json.dumps(value)
        self.process = subprocess.Popen([ACCEL, "serve", "--port", str(self.port)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 120) -> "ServeProcess":
        def check_alive() -> None:
            if self.process.poll() is not None:
                raise RuntimeError(f"accel serve exited: {self.process.stdout.read()}")

        if not wait_until_ready(self.url, timeout, probe_timeout=1, check=check_alive):
            self.process.kill()
            raise RuntimeError("accel serve did not become ready")
        return self

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    def stop(self) -> str:
        """SIGTERM (drain), then the process's output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read()
