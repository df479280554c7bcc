"""A real `ponder serve` under faults: drain on SIGTERM, the drain deadline, a body sent too slowly."""

import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

from tests.live_server import free_port, start_server


def serve(*flags: str):
    port = free_port()
    return start_server([sys.executable, "-m", "ponder.cli", "serve", "--port", str(port), "--device", "cpu", "--dtype", "float32", *flags],
                        port)


def stream_in_thread(base: str, max_tokens: int, started: threading.Event, results: list) -> threading.Thread:
    """A streamed completion read to its end in a thread; appends its parsed events."""
    def run():
        body = json.dumps({"prompt": "Anne Elliot", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
        request = urllib.request.Request(f"{base}/v1/completions", body.encode(), {"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(request, timeout=60) as r:
            for line in r:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                    started.set()
        results.append(events)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def streams_started(base: str, n: int) -> tuple[list[threading.Thread], list]:
    """n long streams, returned once each has its first event."""
    started, results = [threading.Event() for _ in range(n)], []
    threads = [stream_in_thread(base, 240, s, results) for s in started]
    for s in started:
        assert s.wait(30)
    return threads, results


def post(base: str, body: dict) -> tuple[int, object, dict]:
    request = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.load(e)


def test_sigterm_drains_new_requests_get_503_in_flight_ones_finish_and_the_server_exits_0():
    base, proc = serve("--shutdown-timeout", "60", "--max-num-seqs", "4")
    try:
        threads, results = streams_started(base, 4)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, headers, body = post(base, {"prompt": "late", "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") and "shutting down" in body["error"]["message"]
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            raise AssertionError("/health answered 200 while draining")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.load(e)["draining"] is True
        for t in threads:
            t.join(60)
        for events in results:  # every in-flight stream ran to its end
            assert events[-1] == b"[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_past_the_shutdown_timeout_in_flight_requests_end_with_finish_reason_abort():
    base, proc = serve("--shutdown-timeout", "0.2", "--max-num-seqs", "4")
    try:
        threads, results = streams_started(base, 4)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        reasons = [json.loads(events[-2])["choices"][0]["finish_reason"] for events in results]
        assert "abort" in reasons and all(r in ("abort", "length") for r in reasons)
        assert all(events[-1] == b"[DONE]" for events in results)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_body_sent_a_byte_at_a_time_gets_408_and_others_are_served_meanwhile():
    base, proc = serve("--body-timeout", "1")
    try:
        port = int(base.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 64\r\n\r\n{")
        status, _, body = post(base, {"prompt": "Anne", "max_tokens": 2})  # served while the slow body waits
        assert status == 200
        started = time.monotonic()
        slow.settimeout(10)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = slow.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5, reply[:200]
        slow.close()
    finally:
        proc.kill()


def test_a_full_server_refuses_with_429_before_reading_the_body_and_keeps_the_connection():
    """Past capacity a generation request gets its 429 without being parsed (a malformed body gets
    429, not 400), so a retry storm costs the event loop almost nothing; the unread body does not
    break the kept-alive connection, and once a slot frees up requests are served again."""
    import http.client

    base, proc = serve("--max-num-seqs", "1", "--max-waiting", "0")
    try:
        threads, results = streams_started(base, 1)
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
        for body in (b"{not json" + b" " * 20000, json.dumps({"prompt": "late", "max_tokens": 2}).encode()):
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            error = json.loads(r.read())["error"]
            assert r.status == 429 and r.getheader("Retry-After") == "1", (r.status, error)
            assert error["type"] == "overloaded_error" and "max_num_seqs=1" in error["message"]
        conn.request("GET", "/health")  # the same connection, after two unread bodies
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["healthy"] is True
        for t in threads:
            t.join(60)
        assert results[0][-1] == b"[DONE]"
        status, _, body = post(base, {"prompt": "now", "max_tokens": 2})
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    finally:
        proc.kill()
