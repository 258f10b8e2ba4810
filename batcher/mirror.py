"""A job whose output (and so its state directory) is on object storage: the run works on a local staging copy,
and every durable step is mirrored to the store before it counts.

Object stores have no append and no rename, so the journal is kept there as segments: each `append` is one
object `journal/SEQ.jsonl` holding exactly the lines fsync'd locally, put before `append` returns (a PUT is
atomic: an object is there whole or not at all). Compacting (at a resume) or merging writes `journal/SEQ.base`,
the whole journal, after which older objects are deleted; a reader takes the newest base and every segment
after it. So a worker or a driver killed at any point loses only the calls in flight, as on a local disk.

    mirror = Mirror(local_state_dir, "s3://bucket/out/.o.parquet.batcher")
    mirror.pull()                      # the store's state into the staging copy (run.json, journals)
    journal = MirroredJournal(local_dir, mirror, "shards/00003")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from . import storage
from .errors import OutputError
from .sinks import Journal

__all__ = ["Mirror", "MirroredJournal", "staging_dir"]

_SMALL = ("run.json", "budget.json")


def staging_dir(uri: str) -> Path:
    """Where a remote output's run is staged on this machine (`BATCHER_STAGING`, or the user's cache)."""
    base = os.environ.get("BATCHER_STAGING") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "batcher", "staging")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(base) / key


def _seq() -> str:
    return f"{time.time_ns():020d}-{os.getpid()}"


class Mirror:
    def __init__(self, local: Path, remote: str) -> None:
        self.local = local
        self.remote = remote.rstrip("/")
        self.fs, self.root = storage.filesystem(self.remote)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _fail(self, what: str, exc: BaseException) -> OutputError:
        return OutputError(f"cannot {what} {self.remote}: {storage._clean(exc)}")

    def put(self, rel: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(self._path(rel)) as f:
                f.write(data)
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(f"write {rel} in", exc) from None

    def put_file(self, local: Path, rel: str) -> None:
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(self._path(rel)) as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(f"write {rel} in", exc) from None

    def delete(self, rel: str) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            self.fs.delete_file(self._path(rel))

    def _list(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        try:
            infos: list[pafs.FileInfo] = self.fs.get_file_info(
                pafs.FileSelector(self._path(rel), allow_not_found=True, recursive=recursive))
            return infos
        except (OSError, pa.ArrowException) as exc:
            raise self._fail("list", exc) from None

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            data: bytes = f.read()
            return data

    # -- journals -------------------------------------------------------------------------------------------

    def journal_objects(self, rel: str) -> list[str]:
        """The objects that make up the journal in `rel` (`""`: the job's), oldest first, from the newest base."""
        names = sorted(i.path for i in self._list(f"{rel}/journal" if rel else "journal")
                       if i.type == pafs.FileType.File)
        bases = [n for n in names if n.endswith(".base")]
        if bases:
            names = names[names.index(bases[-1]):]
        return names

    def pull_journal(self, rel: str, local_dir: Path) -> None:
        local_dir.mkdir(parents=True, exist_ok=True)
        tmp = local_dir / "journal.pull.tmp"
        with open(tmp, "wb") as out:
            for name in self.journal_objects(rel):
                out.write(self._read(name))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, local_dir / "journal.jsonl")

    def push_base(self, rel: str, local_dir: Path) -> None:
        """The local journal as the new base; older objects go."""
        prefix = f"{rel}/journal" if rel else "journal"
        old = self.journal_objects(rel)
        path = local_dir / "journal.jsonl"
        if path.exists():
            self.put_file(path, f"{prefix}/{_seq()}.base")
        else:
            self.put(f"{prefix}/{_seq()}.base", b"")
        for name in old:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.fs.delete_file(name)

    def drop_tree(self, rel: str) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            self.fs.delete_dir_contents(self._path(rel), missing_dir_ok=True)

    def shard_dirs(self) -> list[str]:
        return sorted(i.base_name for i in self._list("shards") if i.type == pafs.FileType.Directory)

    # -- the whole state ------------------------------------------------------------------------------------

    def pull(self) -> None:
        """The store's state over the staging copy: run.json, budget.json, the job's and the shards' journals."""
        self.local.mkdir(parents=True, exist_ok=True)
        for name in _SMALL:
            try:
                data = self._read(self._path(name))
            except (OSError, pa.ArrowException):
                with contextlib.suppress(FileNotFoundError):
                    (self.local / name).unlink()
                continue
            (self.local / name).write_bytes(data)
        self.pull_journal("", self.local)
        if (self.local / "journal.jsonl").stat().st_size == 0:
            (self.local / "journal.jsonl").unlink()
        import shutil

        shutil.rmtree(self.local / "shards", ignore_errors=True)
        for name in self.shard_dirs():
            self.pull_journal(f"shards/{name}", self.local / "shards" / name)
        plan = self._path("shards/plan.json")
        with contextlib.suppress(OSError, pa.ArrowException):
            (self.local / "shards" / "plan.json").write_bytes(self._read(plan))

    def push_small(self) -> None:
        for name in _SMALL:
            path = self.local / name
            if path.exists():
                self.put(name, path.read_bytes())
            else:
                self.delete(name)

    def push_shards(self) -> None:
        """The staging copy's shards (as cut by `shards.prepare_journals`) as the store's."""
        self.drop_tree("shards")
        root = self.local / "shards"
        if not root.is_dir():
            return
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            self.push_base(f"shards/{d.name}", d)
        if (root / "plan.json").exists():
            self.put("shards/plan.json", (root / "plan.json").read_bytes())


class MirroredJournal(Journal):
    """A journal whose lines also go to the store: each group commit (`sync`, every 0.1 s in a thread while
    answers come) puts the lines written since the last one as one segment object, so the store is as current
    as the local disk's fsync'd part."""

    def __init__(self, directory: Path, mirror: Mirror, rel: str) -> None:
        super().__init__(directory)
        self.mirror = mirror
        self.prefix = f"{rel}/journal" if rel else "journal"
        self._pending: list[bytes] = []
        self._guard = threading.Lock()

    def write(self, data: bytes) -> None:
        super().write(data)
        if data:
            with self._guard:
                self._pending.append(data)

    def sync(self) -> None:
        super().sync()
        self._upload()

    def _upload(self) -> None:
        with self._guard:
            data, self._pending = b"".join(self._pending), []
        if data:
            self.mirror.put(f"{self.prefix}/{_seq()}.jsonl", data)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OutputError):
            self._upload()


def local_scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="batcher-shard-"))
