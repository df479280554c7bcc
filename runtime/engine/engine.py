"""LLMEngine: the engine in one process and one thread, for offline use, tests and benchmarks.

    add_request:  Validator.validate -> EngineCore.add_request, OutputProcessor.add_request
    step:         EngineCore.step -> OutputProcessor.process (a stop-string hit aborts in the core)

The server runs the same three parts split across two processes (runtime/engine/async_llm.py).
"""

from __future__ import annotations

from runtime.checkpoint import Checkpoint
from runtime.engine.core import EngineConfig, EngineCore
from runtime.engine.output_processor import CompletionOutput, OutputProcessor, RequestOutput
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.engine.validation import ValidRequest, Validator

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput"]


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None) -> None:
        self.core = EngineCore(checkpoint, config)
        self.ckpt, self.config, self.tokenizer = checkpoint, self.core.config, checkpoint.tokenizer
        self.validator = Validator(self.core.info)
        self.output_processor = OutputProcessor(checkpoint.tokenizer)

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def executor(self):
        return self.core.executor

    @property
    def cache(self):
        return self.core.cache

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams,
                 compute: ComputeParams | None = None) -> ValidRequest:
        return self.validator.validate(prompt_token_ids, sampling, compute)

    def add_request(self, request_id: str, prompt_token_ids: list[int] | ValidRequest,
                    sampling: SamplingParams | None = None, compute: ComputeParams | None = None,
                    index: int = 0) -> CompletionOutput:
        """Validate (unless given a ValidRequest) and queue a request; raises ParamError (400-class)
        or OverloadedError. Returns the sequence the outputs accumulate into."""
        valid = prompt_token_ids if isinstance(prompt_token_ids, ValidRequest) else \
            self.validate(prompt_token_ids, sampling or SamplingParams(), compute)
        self.core.add_request(request_id, valid)
        return self.output_processor.add_request(request_id, valid, index)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV; False if it is unknown or already finished."""
        found = self.core.scheduler.abort(request_id)
        self.output_processor.abort(request_id)
        return found

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.output_processor.process(self.core.step())
        self.core.abort(stopped)
        return outputs

    # ----- stats -----

    def kv_usage(self) -> float:
        return self.core.scheduler.kv_usage()

    @property
    def num_core_steps(self) -> int:
        return self.core.executor.num_core_steps

    @property
    def num_core_steps_full(self) -> int:
        return self.core.executor.num_core_steps_full

    @property
    def block_steps(self) -> list[int]:
        return self.core.executor.block_steps
