"""LLM: a synchronous API for offline batch generation, in the manner of vLLM's `LLM`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.devices import resolve_device, resolve_dtype
from runtime.engine.engine import EngineConfig, LLMEngine, RequestOutput
from runtime.engine.params import ComputeParams, SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    exit_depths: list[int]
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    mean_depth: float = 0.0  # over every position run for this sequence, prompt included
    reasoning_text: str = ""  # the thoughts, with ComputeParams(include_thoughts=True)
    num_thought_tokens: int = 0


@dataclass
class Completion:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str | Path = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32",
                 **engine_kwargs) -> None:
        dev = resolve_device(device)
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
        completions, owner = [], {}
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
            completions.append(Completion(prompt, ids, []))
            for i in range(sampling.n):
                seed = None if sampling.seed is None else sampling.seed + i
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, ids, replace(sampling, n=1, seed=seed), compute)
                owner[rid] = (completions[-1], CompletionOutput(i, "", [], []))
                completions[-1].outputs.append(owner[rid][1])
        bar = tqdm(total=len(owner), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self._apply(owner[out.request_id][1], out)
                bar.update(out.finished)
        bar.close()
        return completions

    @staticmethod
    def _apply(seq: CompletionOutput, out: RequestOutput) -> None:
        seq.text += out.new_text
        seq.token_ids += out.new_token_ids
        seq.exit_depths += out.exit_depths
        seq.logprobs += out.logprobs
        seq.reasoning_text += out.new_reasoning_text
        seq.num_thought_tokens = out.num_thought_tokens
        if out.finished:
            seq.finish_reason, seq.mean_depth = out.finish_reason, out.mean_depth
