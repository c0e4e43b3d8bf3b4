"""`accel-server` and `python -m server`: the HTTP server's own entry point. `accel serve` forwards here; the
`accel` library never imports the server (it needs the `server` extra: fastapi, uvicorn, prometheus-client).

Exit status: 0 after SIGTERM/SIGINT and the drain (`server.app.drain`), 1 when the models fail to load, 2 for bad
settings."""

from __future__ import annotations

import argparse
import sys

from server.app import serve
from server.settings import SettingsError, load_settings


def build_parser(prog: str = "accel-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="The HTTP server (OpenAI-style images and videos API) with per-request acceleration.")
    parser.add_argument("--config", default=None, help="settings file (YAML, TOML or JSON); env vars ACCEL_* also apply")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    return parser


def main(argv: list[str] | None = None, prog: str = "accel-server") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        settings = load_settings(args.config, host=args.host, port=args.port)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main(prog="python -m server"))
