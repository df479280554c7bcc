"""Chat prompts: the checkpoint's chat template (Jinja, as Hugging Face stores it), else a plain format."""

from __future__ import annotations

import jinja2

# For checkpoints without a template (the from-scratch Austen model has none).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def apply_chat_template(messages: list[dict[str, str]], template: str | None = None, add_generation_prompt: bool = True) -> str:
    """messages: [{"role": ..., "content": ...}] -> the prompt text the model was tuned on."""
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = _raise
    return env.from_string(template or PLAIN_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def _raise(message: str) -> None:  # templates call raise_exception() on conversations they refuse
    raise ValueError(f"chat template: {message}")
