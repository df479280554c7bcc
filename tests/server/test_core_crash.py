"""The engine core dies mid-stream (SIGKILL): in-flight requests end with an error, /health turns
503 at once, and `ponder serve` exits non-zero so that an orchestrator restarts it (as vLLM does)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.live_server import free_port, start_server


def test_killing_the_engine_core_fails_in_flight_requests_and_exits_non_zero():
    port = free_port()
    base, proc = start_server([sys.executable, "-m", "ponder.cli", "serve", "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                              port)
    try:
        pid = json.load(urllib.request.urlopen(f"{base}/health"))["engine_core_pid"]
        assert pid and pid != proc.pid
        body = json.dumps({"prompt": "Anne Elliot", "max_tokens": 240, "ignore_eos": True, "stream": True}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(request, timeout=30) as stream:
            for line in stream:
                if not line.startswith(b"data: "):
                    continue
                events.append(line[6:].strip())
                if len(events) == 1:
                    os.kill(pid, signal.SIGKILL)
        last = json.loads(events[-1])
        assert "error" in last and "engine core" in last["error"]["message"], events[-3:]
        assert last["error"]["code"] == "503" and b"[DONE]" not in events
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            raise AssertionError("/health still answers 200 with the engine core dead")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.load(e)["healthy"] is False
        except urllib.error.URLError:
            pass  # already exited: also not healthy
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_missing_checkpoint_exits_with_a_clear_error_before_any_process_starts(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ponder.cli", "serve", "--model", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 120
