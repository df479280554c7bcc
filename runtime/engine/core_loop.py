"""The engine core's busy loop, and the entry point of the engine-core process.

The loop drains its inbox (new requests, aborts) between steps, so requests that arrive together
are admitted into the same step, steps while anything is unfinished, and emits each step's
outputs with the core's stats. It runs in a thread of the caller (`InprocCoreClient`) or as the
main thread of its own process (`run_core_process`, for `MPCoreClient`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Callable

from runtime.engine.core import EngineConfig, EngineCore
from runtime.engine.core_messages import (
    Abort, AddRequest, Failed, FromCore, Outputs, Ready, Refused, Shutdown, ToCore, decode_to_core, encode,
)
from runtime.engine.scheduler import OverloadedError

log = logging.getLogger(__name__)


class CoreLoop:
    def __init__(self, core: EngineCore, emit: Callable[[FromCore], None]) -> None:
        self.core, self.emit = core, emit
        self._inbox: deque[ToCore] = deque()
        self._wake = threading.Event()

    def put(self, message: ToCore) -> None:
        """Any thread: queue a message for the loop, which applies it before its next step."""
        self._inbox.append(message)
        self._wake.set()

    def run(self) -> None:
        """Until Shutdown, or until the core breaks (then `Failed` is the last message)."""
        try:
            while self._drain():
                if not self.core.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.emit(Outputs(self.core.step(), self.core.stats()))
        except Exception as e:  # a failed step fails only its requests, so this is the core itself
            log.exception("engine core failed")
            self.emit(Failed(f"{type(e).__name__}: {e}"))

    def _drain(self) -> bool:
        aborted: list[str] = []
        while self._inbox:
            message = self._inbox.popleft()
            if isinstance(message, Shutdown):
                return False
            if isinstance(message, Abort):
                self.core.abort(message.request_ids)
                aborted += message.request_ids
            elif isinstance(message, AddRequest):
                self._add(message)
        if aborted:  # the client stops waiting for them, but metrics see the freed KV at once
            self.emit(Outputs([], self.core.stats()))
        return True

    def _add(self, message: AddRequest) -> None:
        try:
            self.core.add_request(message.request_id, message.request)
        except OverloadedError as e:
            self.emit(Refused(message.request_id, "overloaded", str(e)))
        except Exception as e:  # validated already; anything else is a bug, which fails this request only
            log.exception("engine core refused request %s", message.request_id)
            self.emit(Refused(message.request_id, "error", f"{type(e).__name__}: {e}"))


def run_core_process(conn, checkpoint: str, device: str, dtype: str, config: EngineConfig,
                     num_threads: int | None) -> None:
    """The engine-core process: load the model, say Ready, then serve messages from `conn` (a
    multiprocessing Connection used for bytes only) until Shutdown or until the client goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s core: %(message)s")
    import torch

    from runtime.checkpoint import load_checkpoint
    from runtime.devices import resolve_device, resolve_dtype

    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        dev = resolve_device(device)
        chosen = resolve_dtype(dtype, dev)
        logging.getLogger(__name__).info("device %s, dtype %s (--dtype %s), CPU capability %s", dev, chosen, dtype,
                                         torch.backends.cpu.get_cpu_capability())
        core = EngineCore(load_checkpoint(checkpoint, device=dev, dtype=chosen), config)
    except Exception as e:
        conn.send_bytes(encode(Failed(f"{type(e).__name__}: {e}")))
        raise SystemExit(1) from e
    lock = threading.Lock()

    def emit(message: FromCore) -> None:
        with lock:
            conn.send_bytes(encode(message))

    loop = CoreLoop(core, emit)

    def read() -> None:  # its own thread, so a step never waits on the pipe
        try:
            while True:
                loop.put(decode_to_core(conn.recv_bytes()))
        except (EOFError, OSError):  # the client is gone: stop
            loop.put(Shutdown())

    emit(Ready(core.info, os.getpid()))
    threading.Thread(target=read, name="core-reader", daemon=True).start()
    loop.run()
