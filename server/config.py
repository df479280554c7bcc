"""The server's own settings; the model's and the engine's limits come from the engine (`CoreInfo`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    chat_template: str | None = None
