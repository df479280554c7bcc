"""Chat prompts: the tokenizer's chat template when the checkpoint has one, else a plain format."""

from __future__ import annotations

import jinja2

from server.protocol import ChatMessage

# For checkpoints without a template (the from-scratch Austen model has none).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def render_chat(messages: list[ChatMessage], template: str | None = None) -> str:
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    return env.from_string(template or PLAIN_TEMPLATE).render(
        messages=[{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True)
