"""The FastAPI application: state, middleware (request id, access log, metrics; then `server.api.guard`: API key,
body size and time), lifespan (background model loading, scheduler, video-job watcher), the drain on SIGTERM, and
`serve()` for `accel-server`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    job_error,
    validation_error_handler,
)
from server.api.guard import Exchange, Guard
from server.api.openapi import openapi_document
from server.api.routes import router
from server.engine import Engine
from server.jobs import VideoJobs, make_job_store
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.settings import ServerSettings, SettingsError

log = logging.getLogger("accel.server")
STATIC = Path(__file__).with_name("static")  # the playground page (plain HTML/JS/CSS, shipped in the wheel)


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
    exchanges: set[Exchange] = field(default_factory=set)  # requests in flight (the guard keeps it)
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
    # the playground: static files holding no data; the API calls it makes carry the key typed on the page
    app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: openapi_document(app)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    app.add_middleware(Guard, settings=settings, exchanges=app_state.exchanges)
    app.add_middleware(AccessMiddleware, metrics=metrics)  # outermost: logs the guard's refusals
    return app


REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class AccessMiddleware:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the routes):
    request id, one JSON log line per request, request counter, last-resort 500. Headers are read as latin-1
    (HTTP allows any byte in a value), and a client's X-Request-ID is echoed only when it is a plain token."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["log"] = {}
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

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


async def drain(app_state: AppState) -> None:
    """The first SIGTERM/SIGINT: admit no new work (routes answer 503 and `/ready` says draining, while the listener
    stays open), let admitted work and the requests already in flight finish for up to `shutdown_grace_s`, answer
    those still waiting 503 with Retry-After, then cancel the work that is left."""
    scheduler, exchanges = app_state.scheduler, app_state.exchanges
    scheduler.draining = True
    log.info(json.dumps({"event": "draining", "grace_s": app_state.settings.shutdown_grace_s}))
    earlier = set(exchanges)
    end = time.monotonic() + app_state.settings.shutdown_grace_s
    while (scheduler.pending or scheduler.running or earlier & exchanges) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    for exchange in list(exchanges):
        await exchange.refuse(503, "the server shut down before this request finished; retry", "server_error",
                              "shutting_down", headers={"Retry-After": "5"})
    await scheduler.drain(0)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain: the first SIGTERM/SIGINT starts `drain` and stops uvicorn once it is done
    (exit status 0; uvicorn alone stops listening at once and re-raises the signal on exit); a second signal is
    uvicorn's own (stop now; force on a third). HTTP/1.1 by h11, whose header limit httptools lacks."""

    WIND_DOWN_S = 5  # after the drain every request has its answer; tasks still winding down get this long

    def __init__(self, app: FastAPI, settings: ServerSettings):
        super().__init__(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
            timeout_graceful_shutdown=self.WIND_DOWN_S, http="h11",
            h11_max_incomplete_event_size=settings.max_header_bytes, limit_concurrency=settings.max_connections))
        self.app_state: AppState = app.state.accel
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_requested = False
        self.drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.loop is None or self.drain_requested or self.should_exit:
            return super().handle_exit(sig, frame)
        self.drain_requested = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await drain(self.app_state)
        finally:
            self.should_exit = True

    def stop(self) -> None:
        """What SIGTERM does, from any thread (tests run the server in a thread, where signals do not reach)."""
        self.handle_exit(signal.SIGTERM, None)


def serve(settings: ServerSettings) -> int:
    """Run the server until SIGTERM/SIGINT, drain (`drain`), exit 0; 1 when the models fail to load."""
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr, format="%(message)s")
    try:
        app = create_app(settings)
    except SettingsError as exc:  # e.g. job_store=redis and Redis does not answer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = DrainingServer(app, settings)
    failed = []

    def fatal() -> None:
        failed.append(True)
        server.should_exit = True

    app.state.accel.on_fatal = fatal
    server.run()
    return 1 if failed else 0
