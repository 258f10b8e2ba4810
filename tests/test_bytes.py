"""Memory bounded in bytes, not rows (issue 15): long rows make small batches, short rows keep `batch_size`,
a row over the budget goes alone, one over `max_prompt_chars` is still an error row, and the work buffer holds
at most the same budget. Judged by the reader's and the buffer's own counters, never by timing."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from anyio.abc import ObjectSendStream

from batcher import parse_spec, run_job
from batcher.gateway import Gateway
from batcher.pool import Pool, WorkSender
from batcher.sources import Source, SourceRow
from batcher.spec import InputSpec, kept_column_name

from .conftest import options

BUDGET = 64 * 1024  # the smallest budget the spec accepts


def _text(i: int, chars: int) -> str:
    rng = random.Random(i)
    return f"doc {i}: " + "".join(rng.choices("abcdefgh ", k=chars))


def _long_parquet(path: Path, sizes: list[int], row_group_size: int | None = None) -> Path:
    table = pa.table({"id": pa.array(range(len(sizes)), pa.int64()),
                      "text": [_text(i, n) for i, n in enumerate(sizes)]})
    pq.write_table(table, path, row_group_size=row_group_size or max(1, len(sizes)))
    return path


def _batches(spec: InputSpec) -> tuple[Source, list[list[SourceRow]]]:
    source = Source(spec, [])
    return source, list(source.batches())


def _within_budget(batch: list[SourceRow], budget: int) -> bool:
    """A batch holds at most `budget` bytes, unless it is one row bigger than the budget on its own."""
    return len(batch) == 1 or sum(r.nbytes for r in batch) <= budget


def test_long_prompt_run_batches_respect_the_byte_budget(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    # 120 documents of 5-30 KB in one row group (as pandas writes a small file), batch_size left at 1,000.
    sizes = [random.Random(i).randint(5_000, 30_000) for i in range(120)]
    inp = _long_parquet(tmp_path / "docs.parquet", sizes)
    spec = parse_spec(make_spec(
        input={"path": str(inp), "id_column": "id", "prompt": "Summarise:\n\n{{text}}", "batch_bytes": BUDGET},
        output={"path": str(tmp_path / "out.parquet")},
    ))
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == 120
    stats = result.input_stats
    assert stats is not None
    # Every row is ~2 x its text (the value read and the rendered prompt): ~4 MB in all, so 60+ batches.
    held = sum(2 * n for n in sizes)
    assert stats.max_batch_bytes <= BUDGET
    assert stats.batches >= held // BUDGET
    assert stats.max_batch_rows < 10
    # No Parquet read held more than the budget either (reads are sized to a quarter of it on average).
    assert stats.max_read_bytes <= BUDGET
    assert gateway.stats.billed == 120


def test_short_rows_keep_batches_of_batch_size(tmp_path: Path) -> None:
    inp = _long_parquet(tmp_path / "short.parquet", [200] * 2_500, row_group_size=1_000)
    source, batches = _batches(InputSpec(path=inp, id_column="id", prompt="{{text}}", batch_size=1_000))
    assert [len(b) for b in batches] == [1_000, 1_000, 500]
    assert source.stats.reads == 3  # one Arrow read per batch, as before the byte budget


@pytest.mark.parametrize("groups", [1, 7, 40])
def test_every_row_once_in_order_whatever_the_row_groups(tmp_path: Path, groups: int) -> None:
    # Row groups whose rows differ in size: the read size is set afresh for each one.
    sizes = [50 if (i // groups) % 2 else 20_000 for i in range(80)]
    inp = _long_parquet(tmp_path / "mixed.parquet", sizes, row_group_size=groups)
    source, batches = _batches(InputSpec(path=inp, id_column="id", prompt_column="text", batch_bytes=BUDGET))
    assert [r.id for b in batches for r in b] == list(range(80))
    assert all(_within_budget(b, BUDGET) for b in batches)
    assert source.stats.max_batch_bytes <= BUDGET


def test_a_row_over_the_budget_goes_alone_and_one_over_max_prompt_chars_is_an_error(tmp_path: Path) -> None:
    sizes = [10_000, 100_000, 10_000, 300_000, 10_000]
    inp = _long_parquet(tmp_path / "big.parquet", sizes)
    spec = InputSpec(path=inp, id_column="id", prompt_column="text", batch_bytes=BUDGET, max_prompt_chars=200_000)
    _source, batches = _batches(spec)
    assert [[r.id for r in b] for b in batches] == [[0], [1], [2], [3], [4]]
    assert all(_within_budget(b, BUDGET) for b in batches)
    too_long = batches[3][0]
    assert too_long.prompt is None and too_long.error is not None and "max_prompt_chars" in too_long.error
    assert batches[1][0].prompt is not None and batches[1][0].error is None  # over the budget, not an error


def test_jsonl_lines_are_counted_as_they_are_read(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": _text(i, 3_000 + 997 * (i % 40))}) for i in range(200)]
    path.write_text("".join(line + "\n" for line in lines))
    source, batches = _batches(InputSpec(path=path, id_column="id", prompt="Summarise: {{text}}",
                                         batch_bytes=BUDGET))
    assert [r.id for b in batches for r in b] == list(range(200))
    assert all(_within_budget(b, BUDGET) for b in batches)
    assert source.stats.max_read_bytes == max(len(line) + 1 for line in lines)  # one line at a time
    assert len(batches) >= sum(len(line) for line in lines) // BUDGET


# -- the work buffer ------------------------------------------------------------------------------------------


async def _buffer_levels(sizes: list[int], max_bytes: int, concurrency: int) -> tuple[list[int], int, list[int]]:
    """Feed items of `sizes` bytes through a pool; (bytes queued after each send, the buffer's own maximum, the
    items worked)."""
    levels: list[int] = []
    done: list[int] = []
    sender: list[WorkSender[int]] = []

    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        sender.append(work)
        for i in range(len(sizes)):
            await work.send(i)
            levels.append(work.bytes)

    async def work(item: int, _state: None) -> int:
        await anyio.sleep(0.0005)
        return item

    async def write(batch: list[int]) -> None:
        done.extend(batch)

    async def close(_state: None) -> None:
        return None

    pool: Pool[int, int, None] = Pool(concurrency=concurrency, feed=feed, work=work, open_worker=lambda: None,
                                      close_worker=close, write=write, linger=0.005,
                                      item_size=sizes.__getitem__, max_buffer_bytes=max_bytes)
    await pool.run()
    return levels, sender[0].max_bytes_seen, done


@pytest.mark.anyio
async def test_the_work_buffer_holds_at_most_the_byte_budget() -> None:
    # 64 workers would buffer 128 items; at 10 KB each that is 1.3 MB, over a 100 KB budget.
    sizes = [10_000] * 600
    levels, most, done = await _buffer_levels(sizes, 100_000, 64)
    assert sorted(done) == list(range(600))
    assert most <= 100_000 and max(levels) <= 100_000
    assert most >= 50_000  # and it is used: refilled from half empty


@pytest.mark.anyio
async def test_an_item_over_the_buffer_budget_waits_for_an_empty_buffer() -> None:
    sizes = [10_000] * 50 + [500_000] + [10_000] * 50
    _levels, most, done = await _buffer_levels(sizes, 100_000, 8)
    assert sorted(done) == list(range(101))
    assert most == 500_000  # alone: nothing was queued beside it


@pytest.mark.anyio
async def test_without_a_byte_budget_the_buffer_is_bounded_by_items_only() -> None:
    levels: list[int] = []

    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        for i in range(300):
            await work.send(i)
            levels.append(work._stream.statistics().current_buffer_used)

    async def work(item: int, _state: None) -> int:
        await anyio.lowlevel.checkpoint()
        return item

    async def nothing(_: Any) -> None:
        return None

    pool: Pool[int, int, None] = Pool(concurrency=4, feed=feed, work=work, open_worker=lambda: None,
                                      close_worker=nothing, write=nothing)
    await pool.run()
    assert max(levels) <= 8 and pool.sender is not None and pool.sender.bytes == 0


def test_a_dotted_column_name_still_sizes_the_reads(tmp_path: Path) -> None:
    # Parquet names the leaf "my.text" too, and it is not matched by its top-level name: the row group's whole
    # size is the estimate, so reads stay small rather than falling back to batch_size rows.
    table = pa.table({"my.text": [_text(i, 20_000) for i in range(60)]})
    pq.write_table(table, tmp_path / "dotted.parquet", row_group_size=60)
    source, batches = _batches(InputSpec(path=tmp_path / "dotted.parquet", prompt_column="my.text",
                                         batch_bytes=BUDGET))
    assert sum(len(b) for b in batches) == 60
    assert source.stats.max_read_bytes <= BUDGET and source.stats.max_batch_bytes <= BUDGET


def test_csv_batches_respect_the_byte_budget(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,text\n" + "".join(f"{i},{_text(i, 9_000)}\n" for i in range(60)))
    source, batches = _batches(InputSpec(path=path, id_column="id", prompt="Summarise: {{text}}",
                                         batch_bytes=BUDGET))
    assert source.stats.max_batch_bytes <= BUDGET
    assert [str(r.id) for b in batches for r in b] == [str(i) for i in range(60)]
    assert all(_within_budget(b, BUDGET) for b in batches) and len(batches) >= 60 * 18_000 // BUDGET


# -- the final write (kept columns) ---------------------------------------------------------------------------

KEPT = kept_column_name("text", "id")  # a kept `text` is renamed: batcher's answer column is `text`


def _kept_run(make_spec, tmp_path: Path, inp: Path, out_name: str) -> tuple[Any, Path]:  # type: ignore[no-untyped-def]
    out = tmp_path / "out" / out_name
    spec = parse_spec(make_spec(
        input={"path": str(inp), "id_column": "id", "prompt": "Summarise:\n\n{{text}}", "batch_bytes": BUDGET},
        output={"path": str(out), "keep_columns": ["text"]},
    ))
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == 60
    return result, out


def _long_docs_parquet(path: Path, rows: int = 60, chars: int = 20_000) -> Path:
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": [_text(i, chars) for i in range(rows)]})
    pq.write_table(table, path, row_group_size=rows, write_batch_size=4)  # one row group, small pages
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_kept_parquet_columns_are_read_back_and_written_within_the_byte_budget(
    make_spec, gateway: Gateway, tmp_path: Path, fmt: str
) -> None:
    # 60 documents of 20 KB kept in the output (1.2 MB): the final write reads and writes them a budget at a time.
    inp = _long_docs_parquet(tmp_path / "docs.parquet")
    result, out = _kept_run(make_spec, tmp_path, inp, f"out.{fmt}")
    kept, written = result.kept_stats, result.write_stats
    assert kept is not None and written is not None
    assert kept.max_read_bytes <= BUDGET  # was one read of all 60 rows (16,384 at a time)
    assert kept.reads >= 60 * 20_000 // BUDGET
    assert written.slices >= 60 * 20_000 // BUDGET
    if fmt == "parquet":
        assert written.max_group_bytes <= BUDGET  # row groups close by bytes, not only by row_group_size rows
        meta = pq.ParquetFile(out).metadata
        assert meta.num_row_groups >= 60 * 20_000 // BUDGET
        assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) < 10
        assert pq.read_table(out).column(KEPT).to_pylist() == [_text(i, 20_000) for i in range(60)]
    else:
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [x[KEPT] for x in lines] == [_text(i, 20_000) for i in range(60)]


def _docs_input(path: Path, rows: int = 60, chars: int = 20_000) -> Path:
    if path.suffix == ".csv":
        path.write_text("id,text\n" + "".join(f"{i},{_text(i, chars)}\n" for i in range(rows)))
    else:
        path.write_text("".join(json.dumps({"id": i, "text": _text(i, chars)}) + "\n" for i in range(rows)))
    return path


@pytest.mark.parametrize(("inp", "out"), [("jsonl", "parquet"), ("jsonl", "jsonl"), ("csv", "parquet")])
def test_kept_jsonl_and_csv_values_are_read_back_at_the_end_not_carried_by_the_calls(
    make_spec, gateway: Gateway, tmp_path: Path, inp: str, out: str
) -> None:
    # 60 documents of 20 KB kept beside their answers. While the calls last nothing holds them: not the rows in
    # flight, not the answers waiting for the writer (a record is its journal line). At the end they are read
    # back from the input a row at a time, and written within the byte budget.
    result, path = _kept_run(make_spec, tmp_path, _docs_input(tmp_path / f"docs.{inp}"), f"out.{out}")
    journal = path.parent / f".{path.name}.batcher" / "journal.jsonl"
    assert max(len(line) for line in journal.read_bytes().splitlines()) < 2_000  # was 20 KB and more
    kept, written = result.kept_stats, result.write_stats
    assert kept is not None and written is not None
    assert kept.reads == 60 and kept.max_read_bytes <= 20_100  # one row at a time
    assert written.slices >= 60 * 20_000 // BUDGET
    if out == "parquet":
        assert written.max_group_bytes <= BUDGET and written.max_slice_bytes <= BUDGET
        assert pq.ParquetFile(path).metadata.num_row_groups >= 60 * 20_000 // BUDGET
        values = pq.read_table(path).column(KEPT).to_pylist()
    else:
        values = [json.loads(x)[KEPT] for x in path.read_text().splitlines()]
    assert values == [_text(i, 20_000) for i in range(60)]


def test_one_long_kept_value_makes_one_short_slice_not_short_slices_everywhere(
    make_spec, gateway: Gateway, tmp_path: Path
) -> None:
    # 2,000 short rows and one 200 KB document: slices close by what their rows' kept values take, read ahead as
    # the slice is built, so the long row goes alone and the short rows still come ~16 KB at a time.
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": _text(i, 200_000 if i == 700 else 40)}) + "\n"
                           for i in range(2_000)))
    out = tmp_path / "out" / "out.parquet"
    spec = parse_spec(make_spec(
        input={"path": str(inp), "id_column": "id", "prompt": "Summarise:\n\n{{text}}", "batch_bytes": BUDGET},
        output={"path": str(out), "keep_columns": ["text"]},
    ))
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == 2_000
    written = result.write_stats
    assert written is not None and written.max_group_bytes <= BUDGET + 200_100  # the long row's group
    assert written.slices < 100  # ~2,000 x 500 bytes / 16 KB, and the long row's own; sized by the longest: 2,000
    assert pq.read_table(out).column(KEPT).to_pylist() == [_text(i, 200_000 if i == 700 else 40) for i in range(2_000)]


# -- CSV: Arrow reads up to 32 blocks ahead, so the block is sized from the longest record ------------------------


def _csv_docs(path: Path, sizes: list[int]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i, n in enumerate(sizes):
            w.writerow([i, _text(i, n).replace(" ", "\n", 3)])  # quoted values holding newlines count whole
    return path


def test_csv_blocks_are_sized_from_the_longest_record(tmp_path: Path) -> None:
    from batcher.csv_input import BLOCK_SIZE, MIN_BLOCK_SIZE

    inp = _csv_docs(tmp_path / "docs.csv", [20_000] * 150)  # 3 MB: one 8 MiB block before
    source = Source(InputSpec(path=inp, id_column="id", prompt="Summarise: {{text}}", batch_bytes=BUDGET), [])
    assert source.check().rows == 150
    csv_file = source._csv()
    assert csv_file.longest is not None and 20_000 < csv_file.longest < 20_100
    assert csv_file.block_size == MIN_BLOCK_SIZE < BLOCK_SIZE
    batches = list(source.batches())
    assert [int(r.id) for b in batches for r in b] == list(range(150))
    # a read is a block and the partial record carried over from the one before: was one read of 3 MB
    assert 3 <= source.stats.reads and source.stats.max_read_bytes <= MIN_BLOCK_SIZE + csv_file.longest


def test_a_csv_record_longer_than_the_small_block_is_still_read(tmp_path: Path) -> None:
    from batcher.csv_input import MIN_BLOCK_SIZE

    inp = _csv_docs(tmp_path / "docs.csv", [1_000, 2_000_000, 1_000])
    source = Source(InputSpec(path=inp, id_column="id", prompt_column="text", batch_bytes=BUDGET,
                                max_prompt_chars=3_000_000), [])
    source.check()
    assert source._csv().block_size > 2_000_000 > MIN_BLOCK_SIZE
    rows = [r for b in source.batches() for r in b]
    assert [len(r.prompt or "") for r in rows] == [len(_text(i, n)) for i, n in enumerate([1_000, 2_000_000, 1_000])]


# -- CSV blocks and non-ASCII prompts (a 505 MB CSV of 50 KB documents peaked at 551 MB at C=64) ----------------


def test_csv_blocks_are_above_the_mmap_threshold_whatever_the_records(tmp_path: Path) -> None:
    # Below the threshold batcher pins, a block and the parser's buffers sized from it came from malloc's heap,
    # between the small buffers that outlive them (the ids the input check keeps): freed, the heap could not give
    # them back, and it grew with the file. The slack a straddling record may leave out must not bring it under.
    from batcher.csv_input import _BLOCK_SLACK, CsvFile
    from batcher.memory import _MMAP_THRESHOLD

    for longest in (1, 50_000, 200_000, 300_000, 2_000_000):
        assert CsvFile(tmp_path / "docs.csv", ",", longest=longest).block_size - _BLOCK_SLACK > _MMAP_THRESHOLD


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="the heap that kept freed blocks is glibc's, RssAnon is Linux's")
def test_the_input_check_of_a_big_csv_of_long_rows_keeps_no_freed_blocks(tmp_path: Path) -> None:
    # 2,000 records of ~50 KB (100 MB): the check's ids held the heap at +78 MB with 256 KiB blocks, +4 MB now
    path = tmp_path / "docs.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("rid,text\n")
        for i in range(2_000):
            f.write(f'id{i},"{_text(i, 50_000)} naïve ""東京"" 🙂"\n')
    code = (
        "import sys\n"
        "from batcher.memory import tune_process_memory\n"
        "tune_process_memory()\n"
        "from pathlib import Path\n"
        "from batcher.sources import Source\n"
        "from batcher.spec import InputSpec\n"
        "def anon():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) >> 10\n"
        "source = Source(InputSpec(path=Path(sys.argv[1]), id_column='rid', prompt='Summarise: {{text}}'), [])\n"
        "before = anon()\n"
        "assert source.check().rows == 2_000\n"
        "print(anon() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         check=True)
    assert int(out.stdout) < 30, f"the input check left RssAnon {out.stdout.strip()} MB higher"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_non_ascii_prompt_counts_the_memory_its_str_takes(tmp_path: Path, fmt: str) -> None:
    # One emoji makes a str four bytes a character: a 10,000-character prompt takes 40 KB, and was counted 10 KB,
    # so three went into a 64 KiB batch and held 120 KB.
    texts = [_text(i, 10_000) + " 🙂" for i in range(30)]
    path = tmp_path / f"docs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    else:
        path.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    source, batches = _batches(InputSpec(path=path, id_column="id", prompt="Summarise: {{text}}",
                                         batch_bytes=BUDGET))
    assert [str(r.id) for b in batches for r in b] == [str(i) for i in range(30)]
    assert source.stats.max_batch_bytes <= BUDGET
    held = [sum(sys.getsizeof(r.prompt) for r in b) for b in batches]
    assert all(h <= BUDGET for b, h in zip(batches, held, strict=True) if len(b) > 1), held
