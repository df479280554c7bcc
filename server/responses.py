"""The JSON shapes of completions and chat completions: whole responses and stream chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from runtime.engine.output_processor import CompletionOutput


def _shown(include_thoughts: bool, hidden: list[bool], *columns: list) -> list[list]:
    """Drop the entries of thought tokens from per-token columns unless thoughts were asked for."""
    if include_thoughts:
        return list(columns)
    keep = [i for i, h in enumerate(hidden) if not h]
    return [[c[i] for i in keep] for c in columns]


def _logprobs_block(seq_logprobs, token_ids: list[int], depths: list[int], tokenizer: Tokenizer) -> dict:
    return {
        "tokens": [tokenizer.decode([t]) for t in token_ids],
        "token_logprobs": [lp.logprob for lp in seq_logprobs],
        "top_logprobs": [{tokenizer.decode([i]): v for i, v in lp.top_logprobs} for lp in seq_logprobs],
        "exit_depths": depths,
    }


def _offsets(tokens: list[str], start: int) -> list[int]:
    """Character offset of each token in the choice text (OpenAI's logprobs.text_offset)."""
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


@dataclass
class CompletionShape:
    model: str
    tokenizer: Tokenizer
    logprobs: bool  # the request asked for logprobs (each token's exit depth comes with them)
    include_thoughts: bool = False  # reasoning (and reasoning_content, its older name), and logprobs of thought tokens
    echoed: list[str] | None = None  # with echo: the prompt text of each choice, prepended to it
    echo_only: bool = False  # echo with max_tokens=0
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _choice(self, seq: CompletionOutput, text: str, reasoning: str, token_ids, depths, logprobs, hidden, finish) -> dict:
        choice = {"index": seq.index, "text": text, "finish_reason": finish, "logprobs": None}
        if self.include_thoughts:
            choice["reasoning"] = choice["reasoning_content"] = reasoning
        if self.logprobs:
            token_ids, depths, logprobs = _shown(self.include_thoughts, hidden, token_ids, depths, logprobs)
            choice["logprobs"] = _logprobs_block(logprobs, token_ids, depths, self.tokenizer)
        if self.echoed is not None:
            choice["text"] = self.echoed[seq.index] + text
            if self.logprobs:
                prompt = _logprobs_block(seq.prompt_logprobs or [], seq.prompt_token_ids[1:], seq.prompt_depths or [], self.tokenizer)
                first = self.tokenizer.decode(seq.prompt_token_ids[:1])
                choice["logprobs"] = {key: ([first] if key == "tokens" else [None]) + prompt[key] + choice["logprobs"][key]
                                      for key in prompt}
        return choice

    def full(self, seqs: list[CompletionOutput], usage: dict) -> dict:
        choices = [self._choice(s, s.text, s.reasoning_text, s.token_ids, s.exit_depths, s.logprobs, s.hidden, s.finish_reason)
                   for s in seqs]
        for seq, choice in zip(seqs, choices):
            if choice["logprobs"]:  # offsets count from the start of the prompt, as OpenAI's do
                start = 0 if self.echoed is not None else len(self.tokenizer.decode(seq.prompt_token_ids))
                choice["logprobs"]["text_offset"] = _offsets(choice["logprobs"]["tokens"], start)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, seq: CompletionOutput, out) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [self._choice(seq, out.new_text, out.new_reasoning_text, out.new_token_ids, out.exit_depths,
                                         out.logprobs, out.hidden,
                                         out.finish_reason if out.finished else None)]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}


@dataclass
class ChatShape(CompletionShape):
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    started: set[int] = field(default_factory=set)  # choices whose first chunk went out

    def _logprobs(self, logprobs, token_ids, depths, hidden) -> dict | None:
        if not self.logprobs:
            return None
        token_ids, depths, logprobs = _shown(self.include_thoughts, hidden, token_ids, depths, logprobs)
        return {"content": [
            {"token": self.tokenizer.decode([t]), "logprob": lp.logprob, "exit_depth": d,
             "top_logprobs": [{"token": self.tokenizer.decode([i]), "logprob": v} for i, v in lp.top_logprobs]}
            for t, lp, d in zip(token_ids, logprobs, depths)]}

    def full(self, seqs: list[CompletionOutput], usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": s.index, "message": self._message(s),
                             "logprobs": self._logprobs(s.logprobs, s.token_ids, s.exit_depths, s.hidden),
                             "finish_reason": s.finish_reason} for s in seqs],
                "usage": usage}

    def _message(self, seq: CompletionOutput) -> dict:
        message = {"role": "assistant", "content": seq.text}
        if self.include_thoughts:
            message["reasoning"] = message["reasoning_content"] = seq.reasoning_text
        return message

    def chunk(self, seq: CompletionOutput, out) -> dict:
        delta = {"content": out.new_text}
        if self.include_thoughts and out.new_reasoning_text:
            delta["reasoning"] = delta["reasoning_content"] = out.new_reasoning_text
        if seq.index not in self.started:  # the first chunk of each choice names the role
            self.started.add(seq.index)
            delta["role"] = "assistant"
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": seq.index, "delta": delta,
                             "logprobs": self._logprobs(out.logprobs, out.new_token_ids, out.exit_depths,
                                                        out.hidden),
                             "finish_reason": out.finish_reason if out.finished else None}]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}
