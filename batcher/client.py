"""The only module that speaks HTTP: one completion attempt in, a `Completion` or a `Failure` out.

The setup was chosen by measurement (benchmarks/README.md): one shared `httpx.AsyncClient` with a large pool
costs ~9 ms of client CPU per request because httpcore scans its pool on every request, while one
single-connection client per worker costs well under 1 ms. So each worker owns a `WorkerClient`; all of them
share one SSL context (one per client costs 4x the memory). The whole attempt, headers and body, runs under one
anyio deadline: httpx's read timeout restarts on every chunk and would let a trickling server run forever.

The API key lives only in the Authorization header; every message that leaves this module passes `redact`,
because servers sometimes echo what they were sent.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from .routing import Failure, parse_retry_after
from .wire import Completion, ContractError, StreamAssembler, parse_completion

__all__ = ["Endpoint", "WorkerClient", "AttemptFailed"]


@dataclass(frozen=True)
class Endpoint:
    url: str  # the full completions URL
    api: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # holds the Authorization header
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def make(cls, base_url: str, api: str, api_key: str | None, extra: dict[str, str] | None = None) -> Endpoint:
        path = "/v2/router/completions" if api == "orq" else "/v1/completions"
        headers = {"content-type": "application/json", "accept": "application/json", **(extra or {})}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return cls(url=base_url.rstrip("/") + path, api=api, headers=headers, api_key=api_key)

    def redact(self, text: str) -> str:
        if self.api_key and self.api_key in text:
            text = text.replace(self.api_key, "***")
        return text


class AttemptFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = httpx.create_ssl_context()
    return _SSL_CONTEXT


def _error_message(status: int, content: bytes) -> str:
    try:
        data = json.loads(content)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return f"HTTP {status}: {err['message']}"
        if isinstance(err, str):
            return f"HTTP {status}: {err}"
    except (ValueError, UnicodeDecodeError):
        pass
    snippet = content[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f": {snippet}" if snippet else "")


class WorkerClient:
    """One keep-alive connection for one worker."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=None,  # the deadline is enforced around the whole attempt, below
            verify=_ssl_context(),
            headers=endpoint.headers,
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def complete(self, body: dict[str, Any], *, stream: bool, deadline_s: float) -> Completion:
        """One attempt. Raises AttemptFailed with a redacted message on any failure."""
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            with anyio.fail_after(deadline_s):
                if stream:
                    return await self._stream(content)
                response = await self._client.post(self.endpoint.url, content=content)
                if response.status_code != 200:
                    self._raise_status(response.status_code, response.headers, response.content)
                return parse_completion(response.content)
        except TimeoutError:
            raise AttemptFailed(Failure("timeout", f"no complete answer within {deadline_s:g} s")) from None
        except httpx.TransportError as exc:
            msg = self.endpoint.redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
            raise AttemptFailed(Failure("transport", msg)) from None
        except ContractError as exc:
            raise AttemptFailed(Failure("contract", self.endpoint.redact(f"bad response: {exc}"), status=200)) from None

    async def _stream(self, content: bytes) -> Completion:
        async with self._client.stream("POST", self.endpoint.url, content=content) as response:
            if response.status_code != 200:
                self._raise_status(response.status_code, response.headers, await response.aread())
            assembler = StreamAssembler()
            async for line in response.aiter_lines():
                assembler.feed_line(line)
            return assembler.result()

    def _raise_status(self, status: int, headers: httpx.Headers, content: bytes) -> None:
        failure = Failure(
            "status",
            self.endpoint.redact(_error_message(status, content)),
            status=status,
            retry_after=parse_retry_after(headers),
        )
        raise AttemptFailed(failure)
