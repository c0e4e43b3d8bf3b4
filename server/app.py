"""The FastAPI application: state, middleware (request id, body limit, access log, metrics), lifespan
(background model loading, scheduler, video-job watcher, drain on shutdown), and `serve()` for `accel-server`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    job_error,
    validation_error_handler,
)
from server.api.openapi import openapi_document
from server.api.routes import router
from server.engine import Engine
from server.jobs import VideoJobs, make_job_store
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.settings import ServerSettings, SettingsError

log = logging.getLogger("accel.server")


@dataclass
class AppState:
    settings: ServerSettings
    engine: Engine
    metrics: Metrics
    scheduler: Scheduler
    videos: VideoJobs
    ready: bool = False
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    on_fatal: Callable[[], None] | None = None  # called when models fail to load (serve() stops the process)

    def retry_after(self) -> int:
        """Seconds a client should wait when the queue is full: roughly the queue's worth of recent batches."""
        return max(1, min(60, int(len(self.scheduler.pending) / max(1, self.settings.max_batch_size))))


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    store = make_job_store(settings)  # first: an unreachable Redis stops the start-up here
    metrics = Metrics()
    engine = Engine(settings)
    scheduler = Scheduler(engine, settings, metrics)
    videos = VideoJobs(store, scheduler, describe_error=job_error)
    app_state = AppState(settings=settings, engine=engine, metrics=metrics, scheduler=scheduler, videos=videos)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        loading = asyncio.get_running_loop().create_task(_load_models(app_state))
        watching = asyncio.get_running_loop().create_task(videos.watch(settings.job_poll_s))
        try:
            yield
        finally:
            await scheduler.drain(settings.shutdown_grace_s)
            loading.cancel()
            watching.cancel()
            await scheduler.stop()
            videos.close()

    docs = settings.api_docs  # the docs pages load their scripts from a CDN: off unless asked for
    app = FastAPI(title="diffusion-accel", version="0.1.0", lifespan=lifespan,
                  description="Diffusion pipelines with per-request training-free acceleration.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.accel = app_state
    app.include_router(router)
    app.openapi = lambda: openapi_document(app)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    app.add_middleware(AccessMiddleware, settings=settings, metrics=metrics)
    return app


class AccessMiddleware:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the routes):
    request id, body size limit, one JSON log line per request, request counter, last-resort 500."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or secrets.token_hex(8)
        scope.setdefault("state", {})["log"] = {}
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            response = JSONResponse(error_body(f"request body larger than {self.settings.max_body_bytes} bytes",
                                               "invalid_request_error"), status_code=413)
            await response(scope, receive, send_with_id)
        else:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # noqa: BLE001 - last resort: a 500 with the id, the server keeps serving
                log.exception("unhandled error %s", request_id)
                self.metrics.errors.labels(type(exc).__name__).inc()
                if not status["started"]:
                    response = JSONResponse(error_body(f"internal error (request id {request_id})", "server_error"), 500)
                    await response(scope, receive, send_with_id)
        endpoint = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(endpoint, str(status["code"])).inc()
        if endpoint not in ("/health", "/ready", "/metrics"):
            line = {"event": "request", "id": request_id, "method": scope["method"], "path": endpoint,
                    "status": status["code"], "ms": round((time.perf_counter() - start) * 1000, 2),
                    **scope["state"]["log"]}
            log.info(json.dumps(line, default=str))


async def _load_models(app_state: AppState) -> None:
    def loaded(model_id: str, seconds: float) -> None:
        app_state.metrics.model_load_seconds.labels(model_id).set(seconds)

    try:
        await asyncio.to_thread(app_state.engine.load, loaded)
        app_state.ready = True
    except Exception as exc:  # noqa: BLE001 - reported on /ready and fatal for `accel-server`
        app_state.load_error = str(exc)
        log.critical(json.dumps({"event": "model_load_failed", "error": str(exc)}))
        if app_state.on_fatal is not None:
            app_state.on_fatal()


def serve(settings: ServerSettings) -> int:
    """Run the server until SIGTERM/SIGINT; uvicorn drains connections, our lifespan drains the queue."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr, format="%(message)s")
    try:
        app = create_app(settings)
    except SettingsError as exc:  # e.g. job_store=redis and Redis does not answer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None, access_log=False)
    server = uvicorn.Server(config)
    failed = []

    def fatal() -> None:
        failed.append(True)
        server.should_exit = True

    app.state.accel.on_fatal = fatal
    server.run()
    return 1 if failed else 0
