"""What a call in flight holds (HIGH, outside trial: 64 calls of 500 KB non-ASCII documents went to 290 MB, chat
with a schema to 447 MB): its body's encoded bytes, not also the row's prompt, the body's str and the text counted
for tokens, each as big as the document and 4 bytes a character as a str once it holds one emoji. Judged by what
is reachable from each Work item when its call starts, and by the reader's own byte counts, never by RSS."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import parse_spec, run_job
from batcher.call import Caller, Work
from batcher.gateway import Gateway
from batcher.sources import Source
from batcher.spec import InputSpec

from .conftest import options

CHARS = 60_000  # per document: with an emoji, 240 KB as a str, ~70 KB as UTF-8


def _doc(i: int) -> str:
    return f"doc {i}: " + ("é 東京 🙂 word " * (CHARS // 13))[:CHARS]


def _parquet(path: Path, rows: int) -> Path:
    pq.write_table(pa.table({"id": list(range(rows)), "text": [_doc(i) for i in range(rows)]}), path,
                   write_batch_size=16)
    return path


def _strings(obj: Any, seen: set[int] | None = None) -> list[str]:
    """Every str reachable from `obj` through dataclass slots, dicts and lists (each object once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k, seen) + _strings(v, seen)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in _strings(v, seen)]
    slots = getattr(type(obj), "__slots__", ())
    return [s for name in slots for s in _strings(getattr(obj, name, None), seen)]


CHAT = [{"role": "system", "content": "You summarize."}, {"role": "user", "content": "Summarize:\n{{text}}"}]


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache-misses"])
@pytest.mark.parametrize("shape", ["completions", "chat", "chat+schema"])
def test_a_call_in_flight_holds_its_encoded_body_and_no_copy_of_the_prompt(
    make_spec, gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str, cache: bool
) -> None:
    held: list[tuple[int, int, int]] = []  # per call: its encoded body, the str bytes its Work reaches, the body sent
    work = Caller.work

    async def spy(self: Caller, item: Work, client: Any) -> Any:
        strs = sum(sys.getsizeof(s) for s in _strings(item))
        held.append((len(item.content or b""), strs, len(json.dumps(item.body, ensure_ascii=False).encode())))
        return await work(self, item, client)

    monkeypatch.setattr(Caller, "work", spy)
    inp: dict[str, Any] = {"path": str(_parquet(tmp_path / "docs.parquet", 12)), "id_column": "id"}
    request: dict[str, Any] = {"model": "openai/gpt-4o-mini"}
    if cache:  # a row is sealed after its cache lookup misses (a hit never encodes its body)
        request["cache"] = {"type": "exact_match", "ttl": 3600}
    if shape == "completions":
        inp["prompt"] = "Summarize: {{text}}"
    else:
        inp.update(prompt=None, messages=CHAT)  # None: the default spec's prompt goes
    if shape == "chat+schema":
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": {
            "type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
            "additionalProperties": False}}}
    spec = parse_spec(make_spec(input=inp, request=request, output={"path": str(tmp_path / "out.parquet")},
                                limits={"concurrency": 4}))
    result = run_job(spec, options())
    assert result.ok == 12
    assert len(held) == 12
    for content, strs, rest in held:
        assert strs < 8_000  # no str the call keeps holds the document (its prompt would be ~240 KB)...
        assert content > CHARS  # ...the bytes that are sent do
        assert rest < 2_000  # nor in the body's fields it keeps for retries and fallbacks


def test_rendered_messages_count_at_their_size_in_memory(tmp_path: Path) -> None:
    # A chat row's rendered messages are new strings, 4 bytes a character with an emoji: the batch budget
    # counts them so (it counted only the UTF-8 bytes read, a quarter of what the batch held).
    path = _parquet(tmp_path / "docs.parquet", 6)
    for template in ({"messages": CHAT}, {"prompt": "Summarize: {{text}}"}, {"prompt_column": "text"}):
        spec = InputSpec.model_validate({"path": str(path), "id_column": "id", **template})
        for batch in Source(spec, []).batches():
            for row in batch:
                assert row.nbytes >= sys.getsizeof(_doc(row.id))  # its document as a str: 4 bytes a character
