"""AsyncEngine: the engine protocol the server uses: generate() -> async iterator, abort, health.

The engine loop runs in one background thread (torch work blocks); requests talk to it
through an inbox, per-request asyncio queues and a lock. Validation errors raise in the caller at
once. The event loop never waits for a step: new requests and aborts go into inboxes the engine
thread drains between steps, so requests arriving together are admitted into the same step.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
import threading
import time
from collections.abc import AsyncIterator

from runtime.engine.engine import LLMEngine, RequestOutput
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.engine.scheduler import OverloadedError

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._inbox: deque = deque()  # (request_id, prompt ids, sampling, compute) to add before the next step
        self._aborts: deque = deque()  # request ids to abort before the next step
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
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.check_request(prompt_token_ids, sampling, compute)
        max_waiting = self.engine.scheduler.config.max_waiting
        if self.engine.scheduler.num_waiting + len(self._inbox) >= max_waiting:
            raise OverloadedError(f"{max_waiting} requests are already waiting (max_waiting={max_waiting})")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._inbox.append((request_id, list(prompt_token_ids), sampling, compute))
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

    async def abort(self, request_id: str) -> None:
        """Stop a request; the engine thread frees its KV before its next step."""
        self._queues.pop(request_id, None)
        self._aborts.append(request_id)
        self._wake.set()

    def _admit(self) -> None:
        """Apply queued aborts and add queued requests (engine thread, between steps)."""
        with self._lock:
            while self._aborts:
                self.engine.abort(self._aborts.popleft())
            while self._inbox:
                request_id, ids, sampling, compute = self._inbox.popleft()
                if request_id not in self._queues:
                    continue  # aborted before it was added
                try:  # generate() checked it, but the waiting queue may have filled since
                    self.engine.add_request(request_id, ids, sampling, compute)
                except Exception as e:
                    self._deliver([RequestOutput(request_id, [], "", [], [], finished=True, finish_reason="error",
                                                 error=f"{type(e).__name__}: {e}")])

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
        while (self.engine.has_unfinished() or self._inbox) and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            for rid in list(self._queues):
                self._deliver([RequestOutput(rid, [], "", [], [], finished=True, finish_reason="abort")])
                self.engine.abort(rid)
        self._wake.set()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Hand outputs to their requests' queues, waking each event loop once per step, not per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            target = self._queues.get(out.request_id)
            if target is None:
                continue
            loop, queue = target
            if out.finished:
                self._queues.pop(out.request_id, None)
            by_loop.setdefault(loop, []).append((queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _loop(self) -> None:
        while True:
            self._admit()
            if self._stopping and not self.engine.has_unfinished() and not self._inbox:
                return
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    self._deliver(self.engine.step())
            except Exception as e:  # the engine itself broke: report unhealthy, fail what is waiting
                log.exception("engine loop failed")
                self._error = f"{type(e).__name__}: {e}"
                with self._lock:
                    for rid in list(self._queues):
                        self._deliver([RequestOutput(rid, [], "", [], [], finished=True, finish_reason="error",
                                                     error=self._error)])
                        self.engine.abort(rid)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
