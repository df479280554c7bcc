"""Chat prompts: the checkpoint's chat template (Jinja, as Hugging Face stores it), else a plain format."""

from __future__ import annotations

from functools import lru_cache

import jinja2

# For checkpoints without a template (the from-scratch Austen model has none).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def apply_chat_template(messages: list[dict[str, str]], template: str | None = None, add_generation_prompt: bool = True) -> str:
    """messages: [{"role": ..., "content": ...}] -> the prompt text the model was tuned on."""
    return _compiled(template or PLAIN_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


@lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """Compiled once per template: compiling on every request cost CPU and, in an hour's soak, memory
    (the growth tracemalloc found first in the server process)."""
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message: str) -> None:  # templates call raise_exception() on conversations they refuse
    raise ValueError(f"chat template: {message}")
