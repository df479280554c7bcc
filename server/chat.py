"""Chat prompts for the API: request messages through the checkpoint's chat template."""

from __future__ import annotations

from runtime.chat_template import apply_chat_template
from server.protocol import ChatMessage


def render_chat(messages: list[ChatMessage], template: str | None = None) -> str:
    return apply_chat_template([{"role": m.role, "content": m.text()} for m in messages], template)
