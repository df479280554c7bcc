"""LLMEngine: schedule -> execute -> update, over many requests with per-token depth.

The engine works on token ids; it detokenizes only at its edge (output text and stop strings).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from runtime.checkpoint import Checkpoint
from runtime.engine.budget import BudgetController
from runtime.engine.executor import Executor, SeqInput
from runtime.engine.kv_cache import PagedKVCache
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from runtime.engine.request import Request, RequestStatus
from runtime.engine.sampler import Sampled, SampleRow, sample
from runtime.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_seq_len
    num_kv_blocks: int | None = None  # default: enough for max_num_seqs full-length sequences
    max_waiting: int = 256
    default_compute_budget: float = 1.0
    backend: str = "torch"  # torch | onnx (onnxruntime sessions over the graphs in onnx_dir)
    onnx_dir: str | None = None  # written by `ponder export --format onnx` from the same checkpoint

    def __post_init__(self) -> None:
        if not 0.0 < self.default_compute_budget <= 1.0:
            raise ValueError(f"default_compute_budget={self.default_compute_budget} must be in (0, 1]")
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"backend={self.backend!r} must be 'torch' or 'onnx'")
        if self.backend == "onnx" and not self.onnx_dir:
            raise ValueError("backend='onnx' needs onnx_dir, the output of `ponder export --format onnx`")


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    exit_depths: list[int]  # core depth of the position whose logits gave each new token
    logprobs: list[Sampled]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    mean_depth: float = 0.0  # over every position this request ran (prompt and output)


@dataclass
class _Live:
    request: Request
    sampling: SamplingParams
    budget: BudgetController
    compute: ComputeParams
    generator: torch.Generator
    stop_ids: set[int]
    text: str = ""
    emitted_chars: int = 0
    depths: list[int] = field(default_factory=list)


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None) -> None:
        self.ckpt, self.config = checkpoint, config or EngineConfig()
        cfg = checkpoint.config
        self.model = checkpoint.model.eval()
        self.tokenizer = checkpoint.tokenizer
        max_len = self.config.max_model_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        block = self.config.block_size
        num_blocks = self.config.num_kv_blocks or self.config.max_num_seqs * -(-max_len // block)
        self.scheduler = Scheduler(SchedulerConfig(
            num_kv_blocks=num_blocks, max_model_len=max_len, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens, block_size=block,
            max_waiting=self.config.max_waiting, long_prefill_token_threshold=self.config.max_num_batched_tokens,
        ))
        param = next(self.model.parameters())
        self.cache = PagedKVCache(cfg, num_blocks, block, param.device, param.dtype)
        if self.config.backend == "onnx":
            from runtime.engine.ort_executor import OrtExecutor

            self.executor = OrtExecutor(cfg, self.config.onnx_dir, self.cache)
        else:
            self.executor = Executor(self.model, self.cache)
        self.live: dict[str, _Live] = {}
        self.num_core_steps = 0  # block applications that ran
        self.num_core_steps_full = 0  # what full depth would have run for the same positions
        self.block_steps = [0] * cfg.n_pool
        self._seed_rng = random.Random()

    # ----- requests -----

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    compute: ComputeParams | None = None) -> None:
        """Validates and queues a request; raises ParamError / RequestTooLongError / OverloadedError."""
        cfg = self.ckpt.config
        compute = compute or ComputeParams()
        compute.validate(cfg.max_depth)
        if sampling.n != 1:
            raise ParamError("n", "the engine runs one sequence per request; fan n > 1 out above it")
        if not prompt_token_ids:
            raise ParamError("prompt", "is empty; give at least one token")
        if any(not 0 <= t < cfg.vocab_size for t in prompt_token_ids):
            raise ParamError("prompt", f"has token ids outside the vocabulary [0, {cfg.vocab_size})")
        stop_ids = set(sampling.stop_token_ids)
        if cfg.eos_id is not None and not sampling.ignore_eos:
            stop_ids.add(cfg.eos_id)
        seed = sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(63)
        request = Request(request_id, list(prompt_token_ids), sampling.max_tokens)
        self.scheduler.add_request(request)
        self.live[request_id] = _Live(
            request, sampling, BudgetController(compute, self.ckpt.calibration, cfg.max_depth, self.config.default_compute_budget),
            compute, torch.Generator().manual_seed(seed), stop_ids,
        )

    def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id)
        self.live.pop(request_id, None)
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the loop -----

    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        if not sched_out.scheduled:
            return []
        chunks = sched_out.scheduled
        sampled: dict[str, Sampled] = {}
        new_depth: dict[str, int] = {}
        try:
            seqs = [self._seq_input(c) for c in chunks]
            outs = self.executor.run(seqs)
            rows = [i for i, c in enumerate(chunks) if c.samples]
            if rows:
                logits = torch.cat([outs[i].logits for i in rows])
                for i, s in zip(rows, sample(logits, [self._sample_row(chunks[i].request_id) for i in rows])):
                    sampled[chunks[i].request_id] = s
                    new_depth[chunks[i].request_id] = outs[i].depths[-1]
            for c, out in zip(chunks, outs):
                self._account(c.request_id, out.depths, out.paths)
            runner_out = ModelRunnerOutput(sampled={rid: s.token_id for rid, s in sampled.items()})
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            runner_out = ModelRunnerOutput(failed={c.request_id: f"{type(e).__name__}: {e}" for c in chunks})
            sampled.clear()
        return [self._output(u, sampled, new_depth) for u in self.scheduler.update_from_output(runner_out)]

    def _seq_input(self, chunk) -> SeqInput:
        live = self.live[chunk.request_id]
        return SeqInput(chunk.token_ids, chunk.start_position, chunk.block_table, price=live.budget.price,
                        min_depth=live.compute.min_depth, max_depth=live.compute.max_depth)

    def _sample_row(self, request_id: str) -> SampleRow:
        live = self.live[request_id]
        req = live.request
        banned = sorted(live.stop_ids) if len(req.output_token_ids) < live.sampling.min_tokens else []
        return SampleRow(live.sampling, req.prompt_token_ids, req.output_token_ids, live.generator, banned)

    def _account(self, request_id: str, depths: list[int], paths: torch.Tensor) -> None:
        if request_id in self.live:
            self.live[request_id].budget.update(depths)
        self.num_core_steps += sum(depths)
        self.num_core_steps_full += len(depths) * self.ckpt.config.max_depth
        counts = torch.bincount(paths[paths >= 0].flatten().cpu(), minlength=len(self.block_steps)).tolist()
        self.block_steps = [a + b for a, b in zip(self.block_steps, counts)]

    def _output(self, update, sampled: dict[str, Sampled], new_depth: dict[str, int]) -> RequestOutput:
        rid = update.request_id
        live = self.live.get(rid)
        if live is None:  # aborted by the caller
            return RequestOutput(rid, [], "", [], [], finished=True, finish_reason="abort")
        req = live.request
        out = RequestOutput(rid, list(update.new_token_ids), "", [], [], num_prompt_tokens=len(req.prompt_token_ids),
                            num_output_tokens=len(req.output_token_ids))
        if update.new_token_ids:
            out.exit_depths = [new_depth[rid]]
            out.logprobs = [sampled[rid]]
            live.depths.append(new_depth[rid])
        finish = {RequestStatus.FINISHED_LENGTH: "length", RequestStatus.FINISHED_ABORTED: "abort",
                  RequestStatus.FINISHED_ERROR: "error", RequestStatus.FINISHED_STOPPED: "stop"}.get(update.status)
        token = update.new_token_ids[-1] if update.new_token_ids else None
        visible = [t for t in req.output_token_ids if t not in live.stop_ids]
        live.text = self.tokenizer.decode(visible)
        if token is not None and token in live.stop_ids:
            finish = "stop"
        elif live.sampling.stop:
            hit = [live.text.find(s, max(0, live.emitted_chars - len(s))) for s in live.sampling.stop]
            hit = [h for h in hit if h >= 0]
            if hit:
                live.text, finish = live.text[: min(hit)], "stop"
        if finish == "stop" and not update.finished:
            self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED)
        if not finish:  # hold back a tail that might still become a stop string
            hold = max((len(s) - 1 for s in live.sampling.stop), default=0)
            ready = max(live.emitted_chars, len(live.text) - hold)
        else:
            ready = len(live.text)
        out.new_text, live.emitted_chars = live.text[live.emitted_chars : ready], ready
        out.finished, out.finish_reason, out.error = finish is not None, finish, update.error
        out.mean_depth = live.budget.mean_depth
        if out.finished:
            self.live.pop(rid, None)
        return out

    # ----- stats -----

    def kv_usage(self) -> float:
        return self.scheduler.kv_usage()
