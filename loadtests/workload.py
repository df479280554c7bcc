"""What the load generator sends and when: arrival times and prompt sets.

Arrivals follow `vllm bench serve`: at a finite request rate the gaps are gamma-distributed with
shape `burstiness` and mean 1/rate (burstiness 1 is a Poisson process, below 1 burstier, above 1
more regular); at rate inf every request is due at once and `max_concurrency` alone paces them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

# Ordinary English text, tokenized by the server to get a pool of ordinary (non-special) token ids
# for random prompts when no prompt file is given.
SEED_TEXT = (
    "It was a bright cold morning in early spring, and the house by the river was quiet. She walked "
    "along the garden path, thinking of letters she had not written and of friends she had not seen "
    "for many years. The village beyond the hill had changed very little: the church, the mill, the "
    "small shop that sold bread and paper and string. Her brother would arrive on Thursday with news "
    "from the city, and the whole family would sit together at dinner and argue about money, music, "
    "marriage, the weather, the price of land, and whether anyone could be trusted to keep a secret."
)

DEFAULT_CHAT_QUESTIONS = (
    "Who is the most sensible person in the family, and why?",
    "Write a short letter inviting a friend to stay for a week in the country.",
    "Describe a ball at the assembly rooms in a few sentences.",
    "What advice would you give a young woman about to marry?",
    "Summarise the plot of a novel about pride and misunderstanding.",
    "How should a gentleman apologise after giving offence?",
    "Describe a walk through the town on a rainy afternoon.",
    "What makes a good conversation at dinner?",
)


@dataclass
class Prompt:
    """One request's input: `text` for completions, `token_ids` for exact-length random prompts,
    or `messages` for chat completions."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict] | None = None

    def body(self) -> dict:
        if self.messages is not None:
            return {"messages": self.messages}
        return {"prompt": self.token_ids if self.token_ids is not None else self.text}


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start of the run (all 0 at rate inf)."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be positive (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)  # gamma scale: mean gap = shape * scale = 1 / rate
    t, times = 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.gammavariate(burstiness, theta)
    return times


def paragraphs(path: str | Path, min_chars: int = 40) -> list[str]:
    """Blank-line-separated paragraphs of a text file, whitespace collapsed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(p)!r} does not exist")
    paras = [" ".join(block.split()) for block in p.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    paras = [x for x in paras if len(x) >= min_chars]
    if not paras:
        raise ValueError(f"prompt file {str(p)!r} has no paragraph of at least {min_chars} characters")
    return paras


def random_token_prompts(pool: list[int], num: int, input_len: int, seed: int = 0) -> list[Prompt]:
    """`num` prompts of exactly `input_len` token ids drawn uniformly from `pool`."""
    if not pool:
        raise ValueError("the token pool for random prompts is empty")
    if input_len < 1:
        raise ValueError(f"--input-len must be at least 1, got {input_len}")
    rng = random.Random(seed)
    return [Prompt(token_ids=[rng.choice(pool) for _ in range(input_len)]) for _ in range(num)]


def file_prompts(texts: list[str], num: int, input_len: int | None, seed: int = 0) -> list[Prompt]:
    """`num` paragraphs sampled from `texts`, each cut to at most `input_len` words."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        words = rng.choice(texts).split()
        out.append(Prompt(text=" ".join(words[:input_len] if input_len else words)))
    return out


def chat_prompts(texts: list[str], num: int, input_len: int | None, seed: int = 0) -> list[Prompt]:
    """`num` single-turn chats whose user message is a sampled paragraph or question."""
    return [Prompt(messages=[{"role": "user", "content": p.text}]) for p in file_prompts(texts, num, input_len, seed)]
