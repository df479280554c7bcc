"""Clients of the engine core: in a thread of this process, or in a process of its own.

Both take `AddRequest`/`Abort` messages and hand every message from the core (`Outputs`,
`Refused`, `Failed`) to one callback, on a thread of theirs. `ponder serve` uses the process, as
vLLM's API server does with its EngineCore: HTTP, tokenization and detokenization then never
share a GIL with the model's step.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable

from runtime.engine.core import EngineConfig, EngineCore
from runtime.engine.core_loop import CoreLoop, run_core_process
from runtime.engine.core_messages import Failed, FromCore, Ready, Shutdown, ToCore, decode_from_core, encode
from runtime.engine.validation import CoreInfo

log = logging.getLogger(__name__)

Handler = Callable[[FromCore], None]


class EngineDeadError(RuntimeError):
    """The engine core is gone; nothing in flight can finish (HTTP 503)."""


class InprocCoreClient:
    """The core loop in a daemon thread of this process."""

    def __init__(self, core: EngineCore) -> None:
        self.core, self.info, self.pid = core, core.info, None
        self._handler: Handler | None = None
        self._loop = CoreLoop(core, lambda message: self._handler(message))
        self._thread = threading.Thread(target=self._loop.run, name="ponder-engine", daemon=True)

    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._thread.start()

    def send(self, message: ToCore) -> None:
        self._loop.put(message)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        self._loop.put(Shutdown())
        self._thread.join(timeout)


class MPCoreClient:
    """The core in a child process, over a pipe that carries msgpack bytes only."""

    def __init__(self, checkpoint: str, device: str = "auto", dtype: str = "float32",
                 config: EngineConfig | None = None, num_threads: int | None = None,
                 startup_timeout: float = 600.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch or event loop
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=run_core_process, name="ponder-engine-core", daemon=True,
                                 args=(child, str(checkpoint), device, dtype, config or EngineConfig(), num_threads))
        self._proc.start()
        child.close()  # so the pipe reports EOF when the child dies
        self._send_lock = threading.Lock()
        self._closing = False
        first = self._receive(startup_timeout)
        if not isinstance(first, Ready):
            self._proc.join(5)
            raise EngineDeadError(f"the engine core failed to start: {getattr(first, 'message', first)}")
        self.info: CoreInfo = first.info
        self.pid: int = first.pid

    def _receive(self, timeout: float | None = None) -> FromCore:
        if timeout is not None and not self._conn.poll(timeout):
            self._proc.kill()
            raise EngineDeadError(f"the engine core did not start within {timeout:.0f} s")
        try:
            return decode_from_core(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._proc.join(5)
            return Failed(f"the engine core process exited (exit code {self._proc.exitcode})")

    def start(self, handler: Handler) -> None:
        def read() -> None:
            while True:
                message = self._receive()
                if isinstance(message, Failed) and self._closing:
                    return  # the exit we asked for
                handler(message)
                if isinstance(message, Failed):
                    return

        threading.Thread(target=read, name="core-client-reader", daemon=True).start()

    def send(self, message: ToCore) -> None:
        try:
            with self._send_lock:
                self._conn.send_bytes(encode(message))
        except (OSError, ValueError) as e:  # the core is gone; the reader reports it
            log.warning("engine core unreachable: %s", e)

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        self.send(Shutdown())
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(1)
