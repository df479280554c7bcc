"""EngineCore: the scheduler, the KV cache and the executor; one step is schedule -> execute -> update.

It takes validated requests (runtime/engine/validation.py) and returns per-request token news
(`EngineCoreOutput`); text, stop strings and accumulation happen outside it, in the output
processor. `ponder serve` runs it in its own process (runtime/engine/core_process.py); `LLM`
runs it in-process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from runtime.checkpoint import Checkpoint
from runtime.cpu_malloc import keep_freed_memory
from runtime.engine.executor import Executor
from runtime.engine.kv_cache import PagedKVCache
from runtime.engine.outputs import CoreStats, EngineCoreOutput
from runtime.engine.request import Request
from runtime.engine.scheduler import Scheduler, SchedulerConfig
from runtime.engine.structured_output import StructuredOutputManager
from runtime.engine.validation import CoreInfo, ValidRequest

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_seq_len
    num_kv_blocks: int | None = None  # default: max_num_seqs full-length sequences, within kv_cache_gib
    kv_cache_gib: float = 4.0  # memory cap of the default cache size (like vLLM's VLLM_CPU_KVCACHE_SPACE)
    max_waiting: int = 256
    default_compute_budget: float = 1.0
    backend: str = "torch"  # torch | onnx (onnxruntime sessions over the graphs in onnx_dir)
    onnx_dir: str | None = None  # written by `ponder export --format onnx` from the same checkpoint
    fuse_linears: bool = True  # torch backend: q/k/v and gate/up each as one GEMM
    warm_up: bool = True  # torch backend on CPU: build every kernel shape at start-up (Executor.warm_up)

    def __post_init__(self) -> None:
        if not 0.0 < self.default_compute_budget <= 1.0:
            raise ValueError(f"default_compute_budget={self.default_compute_budget} must be in (0, 1]")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib} must be > 0")
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"backend={self.backend!r} must be 'torch' or 'onnx'")
        if self.backend == "onnx" and not self.onnx_dir:
            raise ValueError("backend='onnx' needs onnx_dir, the output of `ponder export --format onnx`")


class EngineCore:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None) -> None:
        self.ckpt, self.config = checkpoint, config or EngineConfig()
        cfg = checkpoint.config
        max_len = self.config.max_model_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        block = self.config.block_size
        param = next(checkpoint.model.parameters())
        if param.device.type == "cpu":
            keep_freed_memory()  # process-wide; activations are not faulted in again at every op
        fits = int(self.config.kv_cache_gib * 2**30) // PagedKVCache.bytes_per_block(cfg, block, param.dtype)
        num_blocks = self.config.num_kv_blocks or min(self.config.max_num_seqs * -(-max_len // block), fits)
        if self.config.num_kv_blocks is None and num_blocks * block < max_len:
            raise ValueError(f"a KV cache of {num_blocks} blocks of {block} cannot hold one {max_len}-token sequence; "
                             f"raise kv_cache_gib or num_kv_blocks, or lower max_model_len")
        self.scheduler = Scheduler(SchedulerConfig(
            num_kv_blocks=num_blocks, max_model_len=max_len, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens, block_size=block,
            max_waiting=self.config.max_waiting, long_prefill_token_threshold=self.config.max_num_batched_tokens,
        ))
        self.cache = PagedKVCache(cfg, num_blocks, block, param.device, param.dtype)
        if self.config.backend == "onnx":
            from runtime.engine.ort_executor import OrtExecutor

            self.executor = OrtExecutor(cfg, self.config.onnx_dir, self.cache)
        else:
            self.executor = Executor(checkpoint.model.eval(), self.cache, self.config.fuse_linears)
            if self.config.warm_up:
                t0 = time.perf_counter()
                calls = self.executor.warm_up(self.config.max_num_batched_tokens, self.config.max_num_seqs, max_len)
                log.info("warm-up: %d linear and %d attention kernel shapes, decode layers in one call on up to "
                         "%s rows, in %.1f s", calls["linear_calls"], calls["attention_calls"],
                         calls.get("whole_layer_rows"), time.perf_counter() - t0)
        thinks = cfg.default_thought_tokens is not None  # trained to open its own thoughts
        self.executor.structured = StructuredOutputManager(checkpoint.tokenizer, cfg.vocab_size, cfg.eos_id,
                                                           cfg.think_start_id if thinks else None)
        self.info = CoreInfo(
            max_depth=cfg.max_depth, min_depth=cfg.min_depth, n_pool=cfg.n_pool, vocab_size=cfg.vocab_size,
            eos_id=cfg.eos_id, think_start_id=cfg.think_start_id, think_end_id=cfg.think_end_id,
            default_thought_tokens=cfg.default_thought_tokens, thought_kv_modes=list(cfg.thought_kv),
            max_model_len=max_len, num_kv_blocks=num_blocks, block_size=block, max_waiting=self.config.max_waiting,
            max_num_seqs=self.config.max_num_seqs,
            default_compute_budget=self.config.default_compute_budget,
            budget_quality=checkpoint.calibration.quality,
            budget_quality_measured_on=checkpoint.calibration.quality_measured_on,
        )

    def add_request(self, request_id: str, valid: ValidRequest) -> None:
        """Queue a validated request; raises OverloadedError when the waiting queue is full."""
        cfg = self.ckpt.config
        self.scheduler.add_request(Request.from_valid(request_id, valid, self.ckpt.calibration, cfg.max_depth,
                                                      (cfg.think_start_id, cfg.think_end_id)))

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def stats(self) -> CoreStats:
        s, e = self.scheduler, self.executor
        return CoreStats(num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_usage(),
                         core_steps=e.num_core_steps, core_steps_full=e.num_core_steps_full,
                         block_steps=list(e.block_steps))
