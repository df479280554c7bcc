"""LLMEngine: schedule -> execute -> update, over many requests with per-token depth.

The engine works on token ids; it detokenizes only at its edge (output text and stop strings).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch

from runtime.checkpoint import Checkpoint
from runtime.engine.budget import BudgetController
from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.executor import Executor, SeqInput
from runtime.engine.kv_cache import PagedKVCache
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from runtime.engine.request import Request, RequestStatus
from runtime.engine.sampler import Sampled, SampleRow, sample
from runtime.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerConfig
from runtime.engine.thoughts import ThoughtState, TokenKind, thought_cap

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

    def __post_init__(self) -> None:
        if not 0.0 < self.default_compute_budget <= 1.0:
            raise ValueError(f"default_compute_budget={self.default_compute_budget} must be in (0, 1]")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib} must be > 0")
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
    hidden: list[bool] = field(default_factory=list)  # per new token: a thought or a thought marker
    new_reasoning_text: str = ""  # new thought text, only with include_thoughts
    num_new_thought_tokens: int = 0
    num_thought_tokens: int = 0  # so far in this request
    # With SamplingParams.prompt_logprobs, on the output that ends the prefill: one entry per prompt
    # token after the first (its logprob given the ones before it) and the exit depth that scored it.
    prompt_logprobs: list[Sampled] | None = None
    prompt_depths: list[int] | None = None
    queue_time: float | None = None  # seconds from add_request to first scheduling, on the first output


@dataclass
class _Live:
    request: Request
    sampling: SamplingParams
    budget: BudgetController
    compute: ComputeParams
    generator: torch.Generator
    stop_ids: set[int]
    thoughts: ThoughtState
    discard_thoughts: bool
    visible: IncrementalDetokenizer  # content tokens (stop ids excluded)
    thoughts_text: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    depths: list[int] = field(default_factory=list)
    emitted_reasoning_chars: int = 0
    prompt_logprobs: list[Sampled] = field(default_factory=list)
    prompt_depths: list[int] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    arrival: float = field(default_factory=time.monotonic)
    queue_time: float | None = None  # set when first scheduled
    queue_time_sent: bool = False


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
        param = next(self.model.parameters())
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
        compute = self.check_request(prompt_token_ids, sampling, compute)
        stop_ids = set(sampling.stop_token_ids)
        if cfg.eos_id is not None and not sampling.ignore_eos:
            stop_ids.add(cfg.eos_id)
        seed = sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(63)
        request = Request(request_id, list(prompt_token_ids), sampling.max_tokens)
        self.scheduler.add_request(request)
        budget = compute.compute_budget if compute.compute_budget is not None else self.config.default_compute_budget
        cap = thought_cap(compute.max_thought_tokens, budget, cfg.default_thought_tokens)
        self.live[request_id] = _Live(
            request, sampling, BudgetController(compute, self.ckpt.calibration, cfg.max_depth, self.config.default_compute_budget),
            compute, torch.Generator().manual_seed(seed), stop_ids,
            ThoughtState.for_prompt(request.prompt_token_ids, cfg.think_start_id, cfg.think_end_id, cap),
            discard_thoughts=(compute.thought_kv or cfg.thought_kv[0]) == "discard",
            visible=IncrementalDetokenizer(self.tokenizer), thoughts_text=IncrementalDetokenizer(self.tokenizer),
        )

    def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id)
        self.live.pop(request_id, None)
        return found

    def check_request(self, prompt_token_ids: list[int], sampling: SamplingParams,
                      compute: ComputeParams | None = None) -> ComputeParams:
        """The checks of add_request that read no request state (so any thread may run them):
        raises ParamError / RequestTooLongError. Returns the compute parameters in effect."""
        cfg = self.ckpt.config
        compute = compute or ComputeParams()
        compute.validate(cfg.max_depth, cfg.thought_kv)
        if sampling.n != 1:
            raise ParamError("n", "the engine runs one sequence per request; fan n > 1 out above it")
        if not prompt_token_ids:
            raise ParamError("prompt", "is empty; give at least one token")
        if any(not 0 <= t < cfg.vocab_size for t in prompt_token_ids):
            raise ParamError("prompt", f"has token ids outside the vocabulary [0, {cfg.vocab_size})")
        self.scheduler.check_fits(len(prompt_token_ids), sampling.max_tokens)
        return compute

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the loop -----

    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        self.cache.move([src for src, _ in sched_out.kv_moves], [dst for _, dst in sched_out.kv_moves])
        if not sched_out.scheduled:  # nothing fits this step (or nothing to do): still close the step
            self.scheduler.update_from_output(ModelRunnerOutput())
            return []
        chunks = sched_out.scheduled
        now = time.monotonic()
        for c in chunks:
            live = self.live.get(c.request_id)
            if live is not None and live.queue_time is None:
                live.queue_time = now - live.arrival
        sampled: dict[str, Sampled] = {}
        new_depth: dict[str, int] = {}
        try:
            seqs = [self._seq_input(c) for c in chunks]
            outs = self.executor.run(seqs)
            rows = [i for i, c in enumerate(chunks) if c.samples]
            if rows:
                logits = torch.cat([outs[i].logits[-1:] for i in rows])
                for i, s in zip(rows, sample(logits, [self._sample_row(chunks[i].request_id) for i in rows])):
                    sampled[chunks[i].request_id] = s
                    new_depth[chunks[i].request_id] = outs[i].depths[-1]
            for c, seq, out in zip(chunks, seqs, outs):
                self._account(c.request_id, out.depths)
                if seq.all_logits:
                    self._score_prompt(c, out)
            paths = torch.cat([out.paths for out in outs])
            counts = torch.bincount(paths[paths >= 0].cpu(), minlength=len(self.block_steps)).tolist()
            self.block_steps = [a + b for a, b in zip(self.block_steps, counts)]
            runner_out = ModelRunnerOutput(sampled={rid: s.token_id for rid, s in sampled.items()})
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            runner_out = ModelRunnerOutput(failed={c.request_id: f"{type(e).__name__}: {e}" for c in chunks})
            sampled.clear()
        return [self._output(u, sampled, new_depth) for u in self.scheduler.update_from_output(runner_out)]

    def _seq_input(self, chunk) -> SeqInput:
        live = self.live[chunk.request_id]
        scores_prompt = (live.sampling.prompt_logprobs is not None and not live.prompt_logprobs_sent
                         and chunk.start_position < len(live.request.prompt_token_ids) - 1)
        return SeqInput(chunk.token_ids, chunk.start_position, chunk.block_table, price=live.budget.price,
                        min_depth=live.compute.min_depth, max_depth=live.compute.max_depth,
                        position_offset=chunk.position_offset, all_logits=scores_prompt)

    def _score_prompt(self, chunk, out) -> None:
        """Logprobs of the prompt tokens this chunk predicts: position p's logits score token p + 1.
        A chunk replayed after preemption scores positions already scored; those are skipped."""
        live = self.live[chunk.request_id]
        prompt, n = live.request.prompt_token_ids, live.sampling.prompt_logprobs
        start = chunk.start_position
        first, end = max(start, len(live.prompt_logprobs)), min(start + len(chunk.token_ids), len(prompt) - 1)
        if first >= end:
            return
        logprobs = torch.log_softmax(out.logits[first - start : end - start].float(), dim=-1)
        targets = torch.tensor(prompt[first + 1 : end + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = torch.topk(logprobs, n) if n else None
        top_ids, top_vals = (top.indices.tolist(), top.values.tolist()) if top else ([[]] * len(chosen), [[]] * len(chosen))
        for token, lp, ids, vals in zip(targets.tolist(), chosen, top_ids, top_vals):
            live.prompt_logprobs.append(Sampled(token, lp, list(zip(ids, vals))))
        live.prompt_depths += out.depths[first - start : end - start]

    def _sample_row(self, request_id: str) -> SampleRow:
        live = self.live[request_id]
        req = live.request
        banned = sorted(live.stop_ids) if len(req.output_token_ids) < live.sampling.min_tokens else []
        return SampleRow(live.sampling, req.prompt_token_ids, req.output_token_ids, live.generator, banned,
                         forced=live.thoughts.forced_token())

    def _account(self, request_id: str, depths: list[int]) -> None:
        if request_id in self.live:
            self.live[request_id].budget.update(depths)
        self.num_core_steps += sum(depths)
        self.num_core_steps_full += len(depths) * self.ckpt.config.max_depth

    def _output(self, update, sampled: dict[str, Sampled], new_depth: dict[str, int]) -> RequestOutput:
        rid = update.request_id
        live = self.live.get(rid)
        if live is None:  # aborted by the caller
            return RequestOutput(rid, [], "", [], [], finished=True, finish_reason="abort")
        req = live.request
        out = RequestOutput(rid, list(update.new_token_ids), "", [], [], num_prompt_tokens=len(req.prompt_token_ids),
                            num_output_tokens=len(req.output_token_ids))
        if live.queue_time is not None and not live.queue_time_sent:
            out.queue_time, live.queue_time_sent = live.queue_time, True
        if live.sampling.prompt_logprobs is not None and not live.prompt_logprobs_sent and (update.new_token_ids or update.finished):
            out.prompt_logprobs, out.prompt_depths = live.prompt_logprobs, live.prompt_depths
            live.prompt_logprobs_sent = True
        if update.new_token_ids:
            out.exit_depths = [new_depth[rid]]
            out.logprobs = [sampled[rid]]
            live.depths.append(new_depth[rid])
            self._track_thoughts(live, out, update)
        finish = {RequestStatus.FINISHED_LENGTH: "length", RequestStatus.FINISHED_ABORTED: "abort",
                  RequestStatus.FINISHED_ERROR: "error", RequestStatus.FINISHED_STOPPED: "stop"}.get(update.status)
        token = update.new_token_ids[-1] if update.new_token_ids else None
        stop_id = token is not None and token in live.stop_ids
        finish = "stop" if stop_id else finish
        live.text = live.visible.text if finish is None else live.visible.final_text()
        if not stop_id and live.sampling.stop:
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
        out.num_thought_tokens = live.thoughts.num_thought_tokens
        if out.finished:
            self.live.pop(rid, None)
        return out

    def _track_thoughts(self, live: _Live, out: RequestOutput, update) -> None:
        """Sort the new token into content or thought; register a closed span for KV discard."""
        req = live.request
        token, index = update.new_token_ids[-1], req.num_tokens - 1
        kind, span = live.thoughts.observe(token, index)
        out.hidden = [kind is not TokenKind.VISIBLE]
        if kind is TokenKind.VISIBLE:
            if token not in live.stop_ids:
                live.visible.append(token)
        else:
            if kind is TokenKind.THOUGHT:
                live.thoughts_text.append(token)
                out.num_new_thought_tokens = 1
            if live.compute.include_thoughts:  # at a marker or the end, a held-back tail is flushed too
                ended = kind is TokenKind.MARKER or update.finished
                reasoning = live.thoughts_text.final_text() if ended else live.thoughts_text.text
                out.new_reasoning_text = reasoning[live.emitted_reasoning_chars :]
                live.emitted_reasoning_chars = len(reasoning)
        if span is not None and live.discard_thoughts and not update.finished:
            self.scheduler.discard_thought(req.request_id, *span)

    # ----- stats -----

    def kv_usage(self) -> float:
        return self.scheduler.kv_usage()
