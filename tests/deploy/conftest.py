"""The Dockerfile's ENTRYPOINT run as a plain process (there is no Docker engine here)."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The image binds 0.0.0.0 (PONDER_HOST); outside a container the test passes --host to stay on loopback.
    passthrough = ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                   "--served-model-name", "container-test", "--log-level", "warning"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(exec_form("ENTRYPOINT") + passthrough, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(160):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail(f"the entrypoint did not start: {proc.stdout.read().decode()[-2000:]}")
    if proc.poll() is not None:
        pytest.fail(f"the entrypoint exited: {proc.stdout.read().decode()[-2000:]}")
    yield base, port
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
