"""Running a request's sequences on the engine, and answering with one JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi.responses import JSONResponse, Response, StreamingResponse

from runtime.engine.output_processor import CompletionOutput, RequestOutput
from runtime.engine.outputs import FinishReason
from runtime.engine.validation import ValidRequest
from server.errors import APIError, api_error
from server.metrics import ServerMetrics

_ids = itertools.count()


class RequestRun:
    """One HTTP request's sequences on the engine: started together, outputs merged as they come,
    metrics observed on the way, and the whole request bounded by the server's timeout."""

    def __init__(self, engine, metrics: ServerMetrics, seqs: list[ValidRequest], num_prompt_tokens: int,
                 timeout_s: float) -> None:
        self.engine, self.metrics, self.seqs, self.timeout_s = engine, metrics, seqs, timeout_s
        self.num_prompt_tokens = num_prompt_tokens  # each prompt once, whatever n
        self.started = time.monotonic()
        self.outputs: list[CompletionOutput | None] = [None] * len(seqs)
        self._last_token: dict[int, float] = {}

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(sequence index, output) in arrival order. Engine errors raise as APIError."""
        # Bounded, so a stream nobody reads backs up into the engine's per-request buffer, whose
        # limit aborts the request (AsyncLLM.max_buffered_outputs) instead of growing memory here.
        queue: asyncio.Queue = asyncio.Queue(maxsize=4 * len(self.seqs))
        base = f"req-{next(_ids)}-{uuid.uuid4().hex[:8]}"

        async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    await queue.put((index, out))
            except Exception as e:  # delivered to the consumer below
                await queue.put((index, e))
            await queue.put((index, None))

        tasks = []
        try:
            for i, valid in enumerate(self.seqs):  # raises overload and shutdown errors before anything is sent
                tasks.append(asyncio.create_task(pump(i, self.engine.generate(f"{base}-{i}", valid, i))))
            remaining = len(tasks)
            while remaining:
                left = self.timeout_s - (time.monotonic() - self.started)
                if left <= 0:  # outputs may keep arriving; the deadline holds all the same
                    raise asyncio.TimeoutError
                index, item = await asyncio.wait_for(queue.get(), timeout=left)
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    self._observe(index, item)
                    yield index, item
        except asyncio.TimeoutError:
            raise APIError(408, f"request timed out after {self.timeout_s}s", "timeout_error") from None
        except APIError:
            raise
        except Exception as e:
            raise api_error(e) from e
        finally:
            for t in tasks:
                t.cancel()

    def _observe(self, index: int, out: RequestOutput) -> None:
        m, now = self.metrics, time.monotonic()
        self.outputs[index] = out.output
        if out.new_token_ids:
            (m.ttft if index not in self._last_token else m.itl).labels(m.model_name).observe(
                now - self._last_token.get(index, self.started))
            self._last_token[index] = now
        if out.queue_time is not None:
            m.queue_time.labels(m.model_name).observe(out.queue_time)
        if out.num_new_thought_tokens:
            m.thought_tokens.labels(m.model_name).inc(out.num_new_thought_tokens)
        for d in out.exit_depths:
            m.exit_depth.labels(m.model_name).observe(d)
        if out.finished:
            m.success.labels(m.model_name, out.finish_reason.value).inc()
            m.generation_tokens.labels(m.model_name).inc(len(out.output.token_ids))

    def finish(self) -> None:
        m = self.metrics
        m.e2e.labels(m.model_name).observe(time.monotonic() - self.started)
        m.prompt_tokens.labels(m.model_name).inc(self.num_prompt_tokens)
        if self.seqs:
            m.budget.labels(m.model_name).observe(self.seqs[0].compute.compute_budget)

    def usage(self, max_depth: int) -> dict:
        seqs = [s for s in self.outputs if s is not None]
        depths = [d for s in seqs for d in s.exit_depths]
        mean = sum(depths) / len(depths) if depths else 0.0
        completion = sum(len(s.token_ids) for s in seqs)
        thoughts = sum(s.num_thought_tokens for s in seqs)
        prompt = self.num_prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "completion_tokens_details": {"reasoning_tokens": thoughts},
                "compute": {"mean_depth": mean, "max_depth": max_depth,
                            "saved_fraction": 1.0 - mean / max_depth if depths and max_depth else 0.0,
                            "thought_tokens": thoughts}}


async def respond(run: RequestRun, shape, stream: bool, include_usage: bool, max_depth: int) -> Response:
    if not stream:
        async for _ in run.stream():
            pass
        if getattr(shape, "echo_only", False):  # the one token run to get there is not part of the answer
            run.outputs = [replace(s, text="", token_ids=[], exit_depths=[], logprobs=[], hidden=[],
                                   finish_reason=FinishReason.LENGTH) for s in run.outputs]
        run.finish()
        return JSONResponse(shape.full(run.outputs, run.usage(max_depth)))

    outputs = run.stream()
    first = await anext(outputs, None)  # errors surface as HTTP errors, before the 200 is sent

    async def events() -> AsyncIterator[str]:
        try:
            item = first
            while item is not None:
                index, out = item
                if out.new_text or out.finished or out.new_token_ids:
                    yield f"data: {json.dumps(shape.chunk(out.output, out))}\n\n"
                item = await anext(outputs, None)
            run.finish()
            if include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(run.usage(max_depth)))}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as e:  # the same shape as a JSON error body
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await outputs.aclose()  # a client that went away aborts its sequences and frees their KV

    return StreamingResponse(events(), media_type="text/event-stream")
