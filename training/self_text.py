"""Text the base model writes itself, from varied chat prompts, generated with Ponder's own engine.

Exit training distils each exit towards the full-depth model. On Austen alone the exits learn
one author's prose; on the model's own answers to varied instructions they learn the model's
distribution where it is served: chat. Each sample is the chat-formatted prompt and the sampled
answer, as token ids, all concatenated into one stream saved as a 1-D int32 tensor.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from runtime.base_model import base_checkpoint
from runtime.chat_template import apply_chat_template

TASKS = [
    "Explain {t} to a curious twelve-year-old.",
    "Write a short story about {t}.",
    "Give three practical tips about {t}.",
    "What are the pros and cons of {t}?",
    "Write a poem about {t}.",
    "Summarize the history of {t} in a paragraph.",
    "Write an email to a friend about {t}.",
    "What is a common misconception about {t}?",
    "Describe {t} as if you were a tour guide.",
    "Answer briefly: why does {t} matter?",
    "Write a dialogue between two people arguing about {t}.",
    "List the steps to get started with {t}.",
]
TOPICS = [
    "photosynthesis", "the French Revolution", "learning to cook", "black holes", "saving money", "dogs",
    "the water cycle", "chess", "public transport", "volcanoes", "writing a résumé", "the Roman Empire",
    "sleep", "gardening", "electric cars", "the internet", "friendship", "climate change", "music practice",
    "the moon landing", "bread baking", "recycling", "the human heart", "mountains", "learning a language",
    "Python programming", "coffee", "the ocean", "running a marathon", "libraries", "bees", "democracy",
    "rainbows", "a rainy day", "video games", "the printing press", "vaccines", "winter", "trains", "kindness",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def prompts(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    pairs = [(task, topic) for task in TASKS for topic in TOPICS]
    rng.shuffle(pairs)
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.format(t=topic)}]
            for task, topic in (pairs * (count // len(pairs) + 1))[:count]]


def generate_self_text(out: Path, base: str = "smollm2-135m", count: int = 256, max_tokens: int = 192,
                       temperature: float = 0.8, batch: int = 32, seed: int = 0) -> Path:
    from runtime.engine.llm import LLM
    from runtime.engine.params import SamplingParams

    llm = LLM(base_checkpoint(base), max_num_seqs=batch)
    template = llm.engine.ckpt.chat_template
    texts = [apply_chat_template(messages, template) for messages in prompts(count, seed)]
    start = time.perf_counter()
    done = llm.generate(texts, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed))
    stream, generated = [], 0
    for completion in done:
        answer = completion.outputs[0].token_ids
        stream += completion.prompt_token_ids + answer
        generated += len(answer)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.tensor(stream, dtype=torch.int32), out)
    seconds = time.perf_counter() - start
    print(f"wrote {out}: {len(stream):,} tokens ({generated:,} generated, {generated / seconds:.1f} tok/s) "
          f"from {count} prompts in {seconds:.0f}s")
    return out
