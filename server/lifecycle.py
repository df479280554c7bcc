"""The server process's life: drain on SIGTERM, exit when the engine core dies.

- **SIGTERM (or Ctrl-C) once:** drain. New requests get 503 with Retry-After and /health answers
  503 (so a load balancer stops routing here); requests in flight run to completion for up to
  `shutdown_timeout` seconds; past it they end with finish_reason "abort". Then the server exits 0.
  A second signal stops at once.
- **The engine core dies:** every in-flight request ends with an error, /health answers 503, and
  the server exits 1 a second later so an orchestrator restarts it (as vLLM's API server does).
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

log = logging.getLogger("ponder.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        self.drain_requested = False

    def handle_exit(self, sig, frame) -> None:
        if self.drain_requested or self.engine.dead is not None:
            return super().handle_exit(sig, frame)  # the second signal: stop now
        self.drain_requested = True
        self.engine.stopping = True  # from here new requests are refused with 503 (server/errors.py)

    async def supervise(self) -> None:
        """Runs for the server's life (started at app startup)."""
        engine = self.engine
        while not self.drain_requested:
            if engine.dead is not None or not engine.client.is_alive():
                engine.mark_dead(engine.dead or "the engine core process exited")
                await asyncio.sleep(1.0)  # in-flight requests get their error; /health says 503 meanwhile
                self.should_exit = True
                return
            await asyncio.sleep(0.1)
        log.info("draining: %d requests in flight, up to %.1f s", engine.num_in_flight(), self.shutdown_timeout)
        deadline = time.monotonic() + self.shutdown_timeout
        while engine.num_in_flight() and time.monotonic() < deadline and engine.dead is None:
            await asyncio.sleep(0.05)
        aborted = engine.abort_all()
        if aborted:
            log.warning("drain timeout: aborted %d requests", aborted)
            await asyncio.sleep(0.5)  # their streams write the final event
        self.should_exit = True

    async def close_engine(self) -> None:
        if self.engine.dead is None:
            await asyncio.to_thread(self.engine.client.close)
