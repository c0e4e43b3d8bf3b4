"""A real uvicorn server in a background thread, for tests over HTTP."""

import socket
import threading
import time

import httpx
import uvicorn

from server.app import create_app
from server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
