"""A black-box OpenAI-compatible HTTP client (aiohttp): one request, timed as `vllm bench serve` times it."""

from __future__ import annotations

import ipaddress
import json
import time
from urllib.parse import urlsplit

import aiohttp

from loadtests.metrics import RequestRecord
from loadtests.workload import Prompt


def check_target(base_url: str, allow_remote: bool = False) -> str:
    """The base URL without a trailing slash; refuses anything but loopback unless `allow_remote`."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url {base_url!r}: expected http://HOST:PORT")
    host = parts.hostname
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not loopback and not allow_remote:
        raise ValueError(f"--base-url {base_url!r} is not a loopback address; pass --allow-remote to load-test "
                         "a server you own elsewhere")
    return base_url.rstrip("/")


class Client:
    """Sends requests to one server. `extra` holds body fields sent with every request (compute_budget...)."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        self.base_url, self.model = base_url, model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=0, force_close=False))

    async def close(self) -> None:
        await self.session.close()

    async def get_text(self, path: str) -> str | None:
        """GET a path; None when the server does not have it."""
        try:
            async with self.session.get(self.base_url + path) as r:
                return await r.text() if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def post_json(self, path: str, body: dict) -> dict:
        async with self.session.post(self.base_url + path, json=body) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                message = (data.get("error") or {}).get("message", data) if isinstance(data, dict) else data
                raise RuntimeError(f"POST {path} -> HTTP {r.status}: {message}")
            return data

    async def resolve_model(self) -> str:
        if self.model is None:
            data = json.loads(await self.get_text("/v1/models") or "{}")
            models = data.get("data") or []
            if not models:
                raise RuntimeError(f"{self.base_url}/v1/models lists no model; pass --model")
            self.model = models[0]["id"]
        return self.model

    async def send(self, prompt: Prompt, max_tokens: int, stream: bool, extra: dict) -> RequestRecord:
        """One request. Never raises for a server or network failure: it is recorded as a failed request."""
        chat = prompt.messages is not None
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": self.model, **prompt.body(), "max_tokens": max_tokens, "stream": stream, **extra}
        if stream:
            body["stream_options"] = {"include_usage": True}
        rec = RequestRecord()
        start = time.perf_counter()
        try:
            async with self.session.post(self.base_url + path, json=body) as r:
                if r.status != 200:
                    rec.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                    return rec
                if stream:
                    await self._read_stream(r, rec, start)
                else:
                    self._read_usage((await r.json(content_type=None)).get("usage"), rec)
                rec.e2e = time.perf_counter() - start
                if not stream:  # as vLLM: without streaming the first token arrives with the last
                    rec.ttft = rec.e2e
                rec.success = not rec.error
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            rec.error = f"{type(e).__name__}: {e}"[:200]
        return rec

    async def _read_stream(self, r: aiohttp.ClientResponse, rec: RequestRecord, start: float) -> None:
        last = None
        chunks = 0
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            data = json.loads(payload)
            if "error" in data:
                rec.error = f"stream error: {data['error'].get('message', data['error'])}"[:200]
                return
            if data.get("usage"):
                self._read_usage(data["usage"], rec)
            if not data.get("choices"):  # as vLLM: every chunk with a choice is a step of output
                continue
            now = time.perf_counter()
            if last is None:
                rec.ttft = now - start
            else:
                rec.itl.append(now - last)
            last, chunks = now, chunks + 1
        if last is None:
            rec.error = rec.error or "the stream carried no output"
        if not rec.output_tokens:  # no usage chunk: count output-carrying chunks
            rec.output_tokens = chunks

    @staticmethod
    def _read_usage(usage: dict | None, rec: RequestRecord) -> None:
        if not usage:
            return
        rec.prompt_tokens = usage.get("prompt_tokens", 0)
        rec.output_tokens = usage.get("completion_tokens", 0)
        compute = usage.get("compute") or {}
        if "mean_depth" in compute:
            rec.mean_depth = compute["mean_depth"]
