"""A real `ponder serve` process on the embedded default model, shared by a test module."""

import sys

import pytest

from tests.live_server import free_port, start_server


@pytest.fixture(scope="module")
def server():
    """(base URL, process) of a fresh server for this module."""
    port = free_port()
    base, proc = start_server([sys.executable, "-m", "ponder.cli", "serve", "--port", str(port), "--device", "cpu",
                               "--dtype", "float32", "--log-level", "info"], port)
    yield base, proc
    if proc.poll() is None:
        proc.kill()


