"""The only module that speaks HTTP: one attempt in, the shape's parsed answer or a `Failure` out.

What the body means and how a response parses is the API shape's (`shapes/`): the client posts to the shape's
path and hands the bytes (or the stream's lines) to `shape.parse` / `shape.new_stream()`.

The setup was chosen by measurement (`python benchmarks/bare.py`, figures in benchmarks/README.md): per request,
aiohttp costs about a third of the client CPU of httpx (~0.2 ms against ~0.6 ms on the reference machine), httpx
over the aiohttp transport (httpx-aiohttp) sits in between, and one shared `httpx.AsyncClient` with a large
pool costs ~8 ms because httpcore scans its pool on every request. So each worker owns a `WorkerClient`: one
aiohttp session holding one keep-alive connection, with no cookie jar and no aiohttp timeouts. All of them share
one SSL context (one per client costs 4x the memory). The whole attempt, headers and body, runs under one anyio
deadline: a per-read timeout restarts on every chunk and would let a trickling server run forever.

The API key lives only in the Authorization header; every message that leaves this module passes `redact`,
because servers sometimes echo what they were sent.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    import aiohttp
    from multidict import CIMultiDictProxy

from .routing import Failure, parse_retry_after
from .shapes import Answer, ContractError, Shape
from .shapes.completions import PATHS as COMPLETIONS_PATHS

__all__ = ["AttemptFailed", "Endpoint", "WorkerClient", "check_api_key", "secret_forms"]


@dataclass(frozen=True)
class Endpoint:
    url: str  # the full URL of the shape's endpoint
    api: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # holds the Authorization header
    api_key: str | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)  # every spelling of the key `redact` removes

    @classmethod
    def make(
        cls, base_url: str, api: str, api_key: str | None, extra: dict[str, str] | None = None, path: str | None = None
    ) -> Endpoint:
        """`path`: the shape's (`shape.path()`); the legacy completions path by default."""
        path = path or COMPLETIONS_PATHS["orq" if api == "orq" else "openai"]
        headers = {"content-type": "application/json", "accept": "application/json", **(extra or {})}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return cls(url=base_url.rstrip("/") + path, api=api, headers=headers, api_key=api_key,
                   secrets=secret_forms(api_key))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def secret_forms(key: str | None) -> tuple[str, ...]:
    """The key as text, and as its UTF-8 or Latin-1 bytes read back in the other encoding: what a server (or
    a header codec) that echoes it may produce. Longest first, so no spelling is left half-replaced."""
    if not key:
        return ()
    forms = {key}
    for encoding in ("utf-8", "latin-1"):
        try:
            raw = key.encode(encoding)
        except UnicodeEncodeError:
            continue
        for decoding in ("utf-8", "latin-1"):
            forms.add(raw.decode(decoding, "replace"))
    return tuple(sorted(forms, key=len, reverse=True))


def check_api_key(key: str | None, variable: str) -> str | None:
    """The key from `variable` with surrounding whitespace (a newline from `$(cat file)`) stripped; a
    SpecError naming the variable, never the key, when what is left is not printable ASCII: an HTTP header
    cannot carry it, and a server would echo it in forms the redaction might not know."""
    from .errors import SpecError

    if key is None:
        return None
    key = key.strip()
    if any(not 32 <= ord(c) < 127 for c in key):
        raise SpecError(f"endpoint.api_key_env: the variable {variable!r} holds a key with control or non-ASCII "
                        "characters (an API key is printable ASCII): check how it was exported")
    return key or None


class AttemptFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """Certificates verified against certifi's bundle when it is installed (as httpx did), else the system's."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        try:
            import certifi

            _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            _SSL_CONTEXT = ssl.create_default_context()
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


class _LineSplitter:
    """Bytes in, complete lines out, split on LF, CRLF or a lone CR, as SSE allows; a CR at the end of a chunk
    waits for the next one, which may start with its LF. Lines are decoded whole, so a UTF-8 character split
    between two chunks arrives intact."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[str]:
        if self._rest:
            data = self._rest + data
        lines = data.splitlines(keepends=True)
        self._rest = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        return [line.rstrip(b"\r\n").decode("utf-8", "replace") for line in lines]

    def close(self) -> list[str]:
        rest, self._rest = self._rest, b""
        return [rest.rstrip(b"\r\n").decode("utf-8", "replace")] if rest else []


class WorkerClient:
    """One keep-alive connection for one worker. Its session is made on the first call, inside the running
    event loop (aiohttp binds a session to the loop that creates it)."""

    def __init__(self, endpoint: Endpoint, shape: Shape | None = None) -> None:
        self.endpoint = endpoint
        if shape is None:
            from .shapes.completions import CompletionsShape
            from .spec import RequestSpec

            shape = CompletionsShape(RequestSpec(), "orq" if endpoint.api == "orq" else "openai")
        self.shape = shape
        self._session: aiohttp.ClientSession | None = None
        self._url: Any = None  # yarl.URL, made with the session
        self._transport_errors: tuple[type[BaseException], ...] = (OSError,)
        self._not_sent: tuple[type[BaseException], ...] = (ConnectionRefusedError,)

    def _open(self) -> aiohttp.ClientSession:
        # Imported on the first call, not with the module: a run answered from the cache, `plan` and
        # `validate` never pay its ~0.15 s.
        import aiohttp
        from yarl import URL  # aiohttp's own URL type (a dependency of aiohttp)

        self._url = URL(self.endpoint.url)  # parsed once, not on every request
        self._transport_errors = (aiohttp.ClientError, OSError)
        self._not_sent = (aiohttp.ClientConnectorError, ConnectionRefusedError)
        connector = aiohttp.TCPConnector(
            limit=1,
            # For http:// the context is never used: skip loading a certificate bundle for nothing.
            ssl=_ssl_context() if self._url.scheme == "https" else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.endpoint.headers,
            timeout=aiohttp.ClientTimeout(),  # none: the deadline is enforced around the whole attempt, below
            cookie_jar=aiohttp.DummyCookieJar(),  # an API client keeps no cookies; parsing them costs CPU
            trust_env=False,
        )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def complete(self, body: dict[str, Any] | bytes, *, stream: bool, deadline_s: float) -> Answer:
        """One attempt of `body`, a dict or its bytes already encoded (`call.encode_body`). Raises AttemptFailed
        with a redacted message on any failure."""
        # allow_nan=False: a body must be strict JSON (RFC 8259); sources map NaN and ±Infinity to null first
        content = body if isinstance(body, bytes) else \
            json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        session = self._session or self._open()
        try:
            with anyio.fail_after(deadline_s):
                async with session.post(self._url, data=content, allow_redirects=False) as response:
                    if response.status != 200:
                        self._raise_status(response.status, response.headers, await response.read())
                    if stream:
                        return await self._stream(response)
                    return self.shape.parse(await response.read())
        except TimeoutError:
            # Possibly billed: the server may have received the request (and may still answer it).
            raise AttemptFailed(Failure("timeout", f"no complete answer within {deadline_s:g} s",
                                        maybe_billed=True)) from None
        except self._transport_errors as exc:
            # ClientError covers refused and dropped connections, truncated bodies and unparseable responses.
            # Only a connection never made (refused, DNS, TLS) is known not to have reached the server.
            msg = self.endpoint.redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
            sent = not isinstance(exc, self._not_sent)
            raise AttemptFailed(Failure("transport", msg, maybe_billed=sent)) from None
        except ContractError as exc:
            raise AttemptFailed(Failure("contract", self.endpoint.redact(f"bad response: {exc}"), status=200,
                                        maybe_billed=True)) from None

    async def _stream(self, response: aiohttp.ClientResponse) -> Answer:
        assembler = self.shape.new_stream()
        lines = _LineSplitter()
        async for chunk in response.content.iter_any():
            for line in lines.feed(chunk):
                assembler.feed_line(line)
        for line in lines.close():
            assembler.feed_line(line)
        return assembler.result()

    def _raise_status(self, status: int, headers: CIMultiDictProxy[str], content: bytes) -> None:
        failure = Failure(
            "status",
            self.endpoint.redact(_error_message(status, content)),
            status=status,
            retry_after=parse_retry_after(headers),
        )
        raise AttemptFailed(failure)
