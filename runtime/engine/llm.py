"""LLM: a synchronous API for offline batch generation, in the manner of vLLM's `LLM`."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.devices import resolve_device, resolve_dtype
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.output_processor import CompletionOutput
from runtime.engine.params import ComputeParams, SamplingParams, fan_out


@dataclass
class Completion:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str | Path = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32",
                 **engine_kwargs) -> None:
        dev = resolve_device(device)
        # Offline generation queues every prompt at once; there is no client to shed load for.
        engine_kwargs.setdefault("max_waiting", sys.maxsize)
        self.engine = LLMEngine(load_checkpoint(model, device=dev, dtype=resolve_dtype(dtype, dev)),
                                EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]], sampling: SamplingParams | None = None,
                 compute: ComputeParams | None = None, use_tqdm: bool = True) -> list[Completion]:
        """Generate for every prompt (text or token ids); n > 1 fans out into n sequences with seeds seed+i."""
        sampling = sampling or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        completions = []
        for prompt in prompts:  # every request is validated before any is queued
            ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
            completions.append((prompt, ids, [self.engine.validate(ids, s, compute) for s in fan_out(sampling)]))
        done = []
        for prompt, ids, valid in completions:
            done.append(Completion(prompt, ids, [self.engine.add_request(f"llm-{next(self._ids)}", v, index=i)
                                                 for i, v in enumerate(valid)]))
        bar = tqdm(total=sum(len(c.outputs) for c in done), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            bar.update(sum(out.finished for out in self.engine.step()))
        bar.close()
        return done
