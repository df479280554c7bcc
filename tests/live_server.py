"""Start a real `ponder serve` (or the image's entrypoint) on a free loopback port and wait for /health."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, tries: int = 120, **popen) -> tuple[str, subprocess.Popen]:
    """(base URL, process) once /health answers; fails the test with the server's output if it never does."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    base = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return base, proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.25)
    proc.kill()
    pytest.fail(f"{cmd[:4]} did not start: {proc.stdout.read().decode()[-2000:]}")
