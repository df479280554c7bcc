"""The Dockerfile's ENTRYPOINT run as a plain process (there is no Docker engine here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live_server import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(instruction: str) -> list[str]:
    """The JSON (exec-form) argument list of the last such instruction (HEALTHCHECK: its CMD)."""
    args = [rest for word, rest in dockerfile_instructions() if word == instruction][-1]
    return json.loads(args[args.index("["):] if instruction == "HEALTHCHECK" else args)


@pytest.fixture(scope="package")
def entrypoint_server():
    """(base URL, port) of the image's ENTRYPOINT with arguments passed through, as `docker run IMAGE ARGS`."""
    port = free_port()
    # The image binds 0.0.0.0 (PONDER_HOST); outside a container the test passes --host to stay on loopback.
    passthrough = ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                   "--served-model-name", "container-test", "--log-level", "warning"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    base, proc = start_server(exec_form("ENTRYPOINT") + passthrough, port, tries=160, cwd=ROOT, env=env)
    yield base, port
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
