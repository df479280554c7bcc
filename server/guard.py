"""API key, admission, body size and body-read time limits, as plain ASGI middleware."""

from __future__ import annotations

import asyncio

from typing import Callable

from server.config import ServerConfig
from server.errors import APIError, api_error

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class Guard:
    """API key, body size and body-read time limits, as plain ASGI middleware: unlike
    @app.middleware("http"), it adds no task or stream hop to each chunk of a streamed response.

    A POST body is read here whole (it is at most max_body_bytes), within body_timeout_s: a client
    that sends its body a byte a second gets a 408 and holds nothing of the engine's.

    A generation request that the engine would refuse (full, draining, dead) gets its 429 or 503
    before its body is read: under a retry storm each refusal costs no JSON parsing, tokenizing or
    validation, so the event loop stays free for the streams that were admitted. The engine's own
    check at `generate` stays the exact one (a request of n sequences may still not fit)."""

    def __init__(self, app, config: ServerConfig, admission: Callable[[], Exception | None] | None = None) -> None:
        self.app, self.config, self.admission = app, config, admission

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config, headers = self.config, dict(scope["headers"])
        if config.api_key and scope["path"].startswith("/v1"):
            if headers.get(b"authorization") != f"Bearer {config.api_key}".encode():
                return await APIError(401, "invalid or missing API key", "authentication_error").response()(
                    scope, receive, send)
        size = headers.get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > config.max_body_bytes:
            return await APIError(413, f"request body of {size} bytes exceeds {config.max_body_bytes}").response()(
                scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.admission is not None and scope["path"] in GENERATE_PATHS:
            refused = self.admission()
            if refused is not None:
                return await api_error(refused).response()(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read_body(receive), config.body_timeout_s)
        except asyncio.TimeoutError:
            body = APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s", "timeout_error")
        if isinstance(body, APIError):
            return await body.response()(scope, receive, send)
        if body is None:
            return  # the client went away
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | APIError | None:
        chunks, received, limit = [], 0, self.config.max_body_bytes
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            received += len(message.get("body", b""))
            if received > limit:
                return APIError(413, f"request body exceeds {limit} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)
