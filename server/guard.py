"""API key and body size limits, as plain ASGI middleware."""

from __future__ import annotations

from server.config import ServerConfig
from server.errors import APIError


class Guard:
    """API key and body size limits, as plain ASGI middleware: unlike @app.middleware("http"), it adds
    no task or stream hop to each chunk of a streamed response."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.config = app, config

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
        if b"content-length" in headers or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, received = [], 0  # chunked: count while reading, then hand the body on
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            received += len(message.get("body", b""))
            if received > config.max_body_bytes:
                return await APIError(413, f"request body exceeds {config.max_body_bytes} bytes").response()(
                    scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
