"""The transport guard: pure ASGI, between the access log and the routes. What it enforces holds whatever the
framing of the request (Content-Length or chunked) and before the application reads a byte of the body:

- API key: checked from the headers alone, so a request without a valid key never has its body read (401).
  Paths in `public_paths` are answered without a key.
- Body size: bytes are counted as they arrive; once past `max_body_bytes` the request is answered 413 and the
  rest of the body is never read (a declared Content-Length over the limit is refused before reading).
- Body time: the whole body must arrive within `body_timeout_s` of the headers, or 408.
- Shutdown: `Exchange.refuse` lets the drain answer a request still waiting when the grace ends (503).

A refusal is the usual JSON error and closes the connection, so an unread body is never drained. Whatever the
application sends after a refusal is dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from server.api.errors import error_body
from server.settings import ServerSettings


class Refused(Exception):
    """Raised into the application by `receive` once the body is refused; the guard answers instead."""


def authorised(settings: ServerSettings, path: str, authorization: str | bytes) -> bool:
    """Whether a request may reach `path`: no keys configured, a public path, or a matching Bearer key (each key
    compared in constant time, all of them every time)."""
    if not settings.api_keys or path in settings.public_paths:
        return True
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1")
    token = authorization[7:] if authorization[:7].lower() == b"bearer " else b""
    matches = [hmac.compare_digest(token, key.get_secret_value().encode()) for key in settings.api_keys]
    return any(matches)


def body_error(status: int, message: str, code: str) -> dict:
    """A refusal of the body (`send_error`'s arguments)."""
    return {"status": status, "message": message, "type": "invalid_request_error", "code": code}


def too_large(limit: int) -> dict:
    return body_error(413, f"request body larger than {limit} bytes", "body_too_large")


async def send_error(send, status: int, message: str, type: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    """A complete JSON error response that also closes the connection."""
    body = json.dumps(error_body(message, type, code=code)).encode()
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
              (b"connection", b"close")]
    fields += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


class Exchange:
    """One request in flight: the bytes of its body so far, its body deadline, and whether its response started.
    `receive` and `send` replace the server's for the application."""

    def __init__(self, receive, send, settings: ServerSettings):
        self._receive, self._send, self.settings = receive, send, settings
        self.deadline = time.monotonic() + settings.body_timeout_s
        self.received = 0
        self.body_done = False
        self.started = False  # a response (the application's or a refusal) has begun
        self.refusal: dict | None = None  # the error answered instead of the application's response

    async def receive(self) -> dict:
        if self.body_done:  # e.g. a route polling for a disconnect while its work runs
            return await self._receive()
        if self.refusal is not None:
            raise Refused()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.refusal = body_error(408, f"the request body did not arrive within {self.settings.body_timeout_s:g} s",
                                      "body_timeout")
            raise Refused() from None
        self.body_done = message["type"] != "http.request" or not message.get("more_body", False)
        self.received += len(message.get("body", b""))
        if self.received > self.settings.max_body_bytes:
            self.refusal = too_large(self.settings.max_body_bytes)
            raise Refused()
        return message

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            if self.started:  # a refusal went out: drop the application's response
                return
            if self.refusal is not None:
                await self.answer()
                return
            self.started = True
        elif self.refusal is not None:
            return
        await self._send(message)

    async def answer(self) -> None:
        """Send the refusal, unless a response already started."""
        if not self.started:
            self.started = True
            await send_error(self._send, **self.refusal)

    async def refuse(self, status: int, message: str, type: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
        """Answer now with an error, if the application has not started its response (used at shutdown)."""
        if not self.started:
            self.refusal = {"status": status, "message": message, "type": type, "code": code, "headers": headers}
            await self.answer()


class Guard:
    """The ASGI middleware: authenticate, check the declared length, then run the application on an `Exchange`
    (kept in `exchanges` while it runs, for the drain)."""

    def __init__(self, app, settings: ServerSettings, exchanges: set[Exchange]):
        self.app, self.settings, self.exchanges = app, settings, exchanges

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if not authorised(self.settings, scope["path"], headers.get(b"authorization", b"")):
            return await send_error(send, 401, "missing or invalid API key (Authorization: Bearer ...)",
                                    "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return await send_error(send, **too_large(self.settings.max_body_bytes))
        exchange = Exchange(receive, send, self.settings)
        self.exchanges.add(exchange)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:
            if exchange.refusal is None:
                raise
        finally:
            self.exchanges.discard(exchange)
        if exchange.refusal is not None:
            await exchange.answer()
