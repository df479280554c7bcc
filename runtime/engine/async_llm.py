"""AsyncLLM: the engine protocol the server uses: validate, generate() -> async iterator, abort, health.

It holds the validator and the output processor (this process), and a client of the engine core
(its own process for `ponder serve`, or a thread here). Core outputs arrive on the client's
thread; they are turned into text there, under one lock, and handed to each request's asyncio
queue with one wake-up per event loop and step. The event loop never waits for a step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from runtime.engine.core_client import EngineDeadError, InprocCoreClient, MPCoreClient
from runtime.engine.core_messages import Abort, AddRequest, Failed, FromCore, Outputs, Refused
from runtime.engine.output_processor import OutputProcessor, RequestOutput
from runtime.engine.outputs import CoreStats, FinishReason
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.engine.scheduler import OverloadedError
from runtime.engine.validation import ValidRequest, Validator

log = logging.getLogger(__name__)


class EngineShuttingDownError(RuntimeError):
    """The server is draining and takes no new requests (HTTP 503)."""


class ClientTooSlowError(RuntimeError):
    """A stream's consumer stopped reading; its request was aborted to free the engine (HTTP 408)."""


class AsyncLLM:
    def __init__(self, client: InprocCoreClient | MPCoreClient, tokenizer, max_buffered_outputs: int = 256) -> None:
        """max_buffered_outputs: outputs a request's consumer may leave unread; past it the request is
        aborted and its KV freed (a stuck client must not hold the engine or grow memory)."""
        if max_buffered_outputs < 1:
            raise ValueError(f"max_buffered_outputs={max_buffered_outputs} must be >= 1")
        self.client, self.info = client, client.info
        self.max_buffered_outputs = max_buffered_outputs
        self.validator = Validator(client.info)
        self.processor = OutputProcessor(tokenizer)
        self._lock = threading.Lock()  # the processor and the queues: event loop and client thread
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = CoreStats(block_steps=[0] * client.info.n_pool)
        self._num_unadmitted = 0  # sent but not yet seen in the core's stats: counts toward max_waiting
        self._too_slow: list[str] = []  # aborted for unread outputs during the last delivery
        self.dead: str | None = None  # why the core is gone
        self.stopping = False
        client.start(self._on_message)

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams,
                 compute: ComputeParams | None = None) -> ValidRequest:
        """Raises ParamError (HTTP 400); call it for every sequence before generating any."""
        return self.validator.validate(prompt_token_ids, sampling, compute)

    def admission_error(self) -> Exception | None:
        """Why a new request would be refused now (dead, shutting down, or full), else None. Cheap:
        the HTTP layer asks it before reading a body, so a 429 costs no parsing or tokenizing."""
        if self.dead:
            return EngineDeadError(f"the engine core is dead: {self.dead}")
        if self.stopping:
            return EngineShuttingDownError("the server is shutting down; retry on another replica")
        info, s = self.info, self._stats
        if s.num_running + s.num_waiting + self._num_unadmitted >= info.max_num_seqs + info.max_waiting:
            return OverloadedError(f"{s.num_running} requests are running and {s.num_waiting + self._num_unadmitted} "
                                   f"waiting (max_num_seqs={info.max_num_seqs}, max_waiting={info.max_waiting})")
        return None

    def generate(self, request_id: str, valid: ValidRequest, index: int = 0) -> AsyncIterator[RequestOutput]:
        """Queue a request; its outputs come as an async iterator, one per step that produced
        something, the last with finished=True. Raises EngineDeadError, EngineShuttingDownError or
        OverloadedError here; a refusal by the core itself (overloaded) raises from the iterator.
        Call it from a running event loop."""
        error = self.admission_error()
        if error is not None:
            raise error
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.processor.add_request(request_id, valid, index)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._num_unadmitted += 1
        self.client.send(AddRequest(request_id, valid))
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away (client disconnect): free the KV now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.processor.abort(request_id)
            self._queues.pop(request_id, None)
        self.client.send(Abort([request_id]))

    # ----- from the core, on the client's thread -----

    def _on_message(self, message: FromCore) -> None:
        if isinstance(message, Outputs):
            with self._lock:
                self._stats, self._num_unadmitted = message.stats, 0
                outputs, stopped = self.processor.process(message.outputs)
                self._deliver([(out.request_id, out) for out in outputs], [out.finished for out in outputs])
                stopped, self._too_slow = stopped + self._too_slow, []
            if stopped:
                self.client.send(Abort(stopped))
        elif isinstance(message, Refused):
            error = OverloadedError(message.message) if message.kind == "overloaded" else RuntimeError(message.message)
            with self._lock:
                self._num_unadmitted = max(0, self._num_unadmitted - 1)
                self.processor.abort(message.request_id)
                self._deliver([(message.request_id, error)], [True])
        elif isinstance(message, Failed):
            self.mark_dead(message.message)

    def mark_dead(self, reason: str) -> None:
        """The core died: every request in flight ends with an error."""
        log.error("engine core died: %s", reason)
        self.dead = reason
        with self._lock:
            ids = list(self._queues)
            for rid in ids:
                self.processor.abort(rid)
            self._deliver([(rid, EngineDeadError(f"the engine core died: {reason}")) for rid in ids], [True] * len(ids))

    def _deliver(self, items: list[tuple[str, object]], finished: list[bool]) -> None:
        """Hand items to their requests' queues, waking each event loop once, not once per item."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (rid, item), done in zip(items, finished):
            target = self._queues.get(rid)
            if target is not None and not done and target[1].qsize() >= self.max_buffered_outputs:
                self.processor.abort(rid)  # nobody reads it: free the engine, end the stream with an error
                self._too_slow.append(rid)
                item, done = ClientTooSlowError(f"the client left {target[1].qsize()} outputs unread; request "
                                                f"aborted"), True
            if done:
                self._queues.pop(rid, None)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    # ----- state -----

    def health(self) -> dict:
        s = self._stats
        healthy = self.dead is None and self.client.is_alive() and not self.stopping
        return {"healthy": healthy, "error": self.dead, "draining": self.stopping, "engine_core_pid": self.client.pid,
                "num_running": s.num_running, "num_waiting": s.num_waiting, "kv_cache_usage": s.kv_cache_usage}

    def stats(self) -> dict:
        """Queue sizes, KV usage and compute accounting, for metrics (as of the core's last step)."""
        s = self._stats
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "kv_cache_usage": s.kv_cache_usage,
                "core_steps": s.core_steps, "core_steps_full": s.core_steps_full, "block_steps": list(s.block_steps)}

    def num_in_flight(self) -> int:
        return len(self._queues)

    def abort_all(self) -> int:
        """End every request in flight with finish_reason "abort" (and free its KV); returns how many."""
        with self._lock:
            ids = list(self._queues)
            ended = [(rid, RequestOutput(rid, seq, finish_reason=FinishReason.ABORT))
                     for rid in ids if (seq := self.processor.abort(rid)) is not None]
            self._deliver(ended, [True] * len(ended))
        if ids:
            self.client.send(Abort(ids))
        return len(ids)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `timeout` s, abort the rest, and
        stop the core."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self._queues and self.dead is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.abort_all()
        self.client.close()


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
