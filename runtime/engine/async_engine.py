"""AsyncEngine: the engine protocol the server uses: generate() -> async iterator, abort, health.

The engine loop runs in one background thread (torch work blocks); requests talk to it
through a lock and per-request asyncio queues. Validation errors raise in the caller at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from runtime.engine.engine import LLMEngine, RequestOutput
from runtime.engine.params import ComputeParams, SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="ponder-engine", daemon=True)
        self._thread.start()

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 compute: ComputeParams | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its outputs as an async iterator: one RequestOutput per step
        that produced something, the last with finished=True. Raises ParamError, RequestTooLongError
        or OverloadedError here, before anything is queued. Call it from a running event loop."""
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already running")
            self.engine.add_request(request_id, prompt_token_ids, sampling, compute)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away (client disconnect): free the KV now
                await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        with self._lock:
            self._queues.pop(request_id, None)
            return self.engine.abort(request_id)

    def health(self) -> dict:
        return {"healthy": self._thread.is_alive() and self._error is None, "error": self._error,
                "num_running": self.engine.scheduler.num_running, "num_waiting": self.engine.scheduler.num_waiting,
                "kv_cache_usage": self.engine.kv_usage()}

    def stats(self) -> dict:
        """Queue sizes, KV usage and compute accounting, for metrics."""
        e = self.engine
        return {"num_running": e.scheduler.num_running, "num_waiting": e.scheduler.num_waiting,
                "kv_cache_usage": e.kv_usage(), "core_steps": e.num_core_steps,
                "core_steps_full": e.num_core_steps_full, "block_steps": list(e.block_steps)}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `timeout` s, then abort the rest."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            for rid in list(self._queues):
                self._deliver(RequestOutput(rid, [], "", [], [], finished=True, finish_reason="abort"))
                self.engine.abort(rid)
        self._wake.set()

    def _deliver(self, out: RequestOutput) -> None:
        target = self._queues.get(out.request_id)
        if target is None:
            return
        loop, queue = target
        if out.finished:
            self._queues.pop(out.request_id, None)
        loop.call_soon_threadsafe(queue.put_nowait, out)

    def _loop(self) -> None:
        while True:
            if self._stopping and not self.engine.has_unfinished():
                return
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    for out in self.engine.step():
                        self._deliver(out)
            except Exception as e:  # the engine itself broke: report unhealthy, fail what is waiting
                log.exception("engine loop failed")
                self._error = f"{type(e).__name__}: {e}"
                with self._lock:
                    for rid in list(self._queues):
                        self._deliver(RequestOutput(rid, [], "", [], [], finished=True, finish_reason="error",
                                                    error=self._error))
                        self.engine.abort(rid)
