"""A job whose output (and so its state directory) is on object storage: the run works on a local staging copy,
and every durable step is mirrored to the store before it counts.

Object stores have no append and no rename, so the journal is kept there as segments: each group commit is one
object `journal/SEQ.jsonl` holding exactly the lines fsync'd locally in it (a PUT is atomic: an object is there
whole or not at all). Compacting (at a resume) or merging writes `journal/SEQ.base`, the whole journal, after
which older objects are deleted; a reader takes the newest base and every segment after it. So a worker or a
driver killed at any point loses only the calls in flight, as on a local disk.

The budget's `spend.log` (a line per call, written before the call is sent) is kept the same way, as
`spend/SEQ.log` segments put on the same 0.1 s rhythm and a `spend/SEQ.base` written after each fold, so a resume
on another machine counts the calls that were in flight and the cost carried for dropped answers and error
rows. When this machine's staging copy of it extends the store's (a `kill -9` here, then a rerun here), the
copy is kept: its last lines may not have reached the store. `dropped.jsonl` (answers for ids no longer in the
input) is put whole whenever a resume adds to it, as are `run.json` and `budget.json`.

    mirror = Mirror(local_state_dir, "s3://bucket/out/.o.parquet.batcher")
    mirror.pull()                      # the store's state into the staging copy (run.json, journals, spend logs)
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

import anyio
import pyarrow as pa
import pyarrow.fs as pafs

from . import storage
from .budget import SpendLog
from .errors import OutputError
from .sinks import DROPPED, Journal

__all__ = ["Mirror", "MirroredJournal", "MirroredSpendLog", "staging_dir"]

_SMALL = ("run.json", "budget.json")
# The append-only logs of a state folder: (local file, folder of its objects on the store)
_LOGS = {"journal": ("journal.jsonl", "journal"), "spend": (SpendLog.NAME, "spend")}


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

    # -- journals and spend logs ----------------------------------------------------------------------------

    def _prefix(self, rel: str, kind: str) -> str:
        folder = _LOGS[kind][1]
        return f"{rel}/{folder}" if rel else folder

    def log_objects(self, rel: str, kind: str = "journal") -> list[str]:
        """The objects that make up a log in `rel` (`""`: the job's), oldest first, from the newest base."""
        names = sorted(i.path for i in self._list(self._prefix(rel, kind)) if i.type == pafs.FileType.File)
        bases = [n for n in names if n.endswith(".base")]
        if bases:
            names = names[names.index(bases[-1]):]
        return names

    def journal_objects(self, rel: str) -> list[str]:
        return self.log_objects(rel, "journal")

    def pull_log(self, rel: str, local_dir: Path, kind: str, *, keep_extension: bool = False) -> None:
        """The store's copy of a log over the local one. `keep_extension`: a local copy that holds the store's
        and more (lines written here that a crash kept from reaching the store) stays as it is."""
        local_dir.mkdir(parents=True, exist_ok=True)
        names = self.log_objects(rel, kind)
        path = local_dir / _LOGS[kind][0]
        if keep_extension and path.exists() and self._extends(path, names):
            return
        if kind != "journal" and not names:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        tmp = local_dir / f"{path.name}.pull.tmp"
        with open(tmp, "wb") as out:
            for name in names:
                out.write(self._read(name))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def _extends(self, local: Path, names: list[str]) -> bool:
        """Whether the local file begins with the concatenation of `names` (compared a piece at a time)."""
        with open(local, "rb") as f:
            for name in names:
                data = self._read(name)
                if f.read(len(data)) != data:
                    return False
        return True

    def pull_journal(self, rel: str, local_dir: Path) -> None:
        self.pull_log(rel, local_dir, "journal")

    def pull_spend(self, rel: str, local_dir: Path) -> None:
        """The spend log of `rel`, keeping a local copy that extends the store's (see the module's docstring)."""
        self.pull_log(rel, local_dir, "spend", keep_extension=True)

    def push_base(self, rel: str, local_dir: Path, kind: str = "journal") -> None:
        """The local log as the new base; older objects go. A missing local spend log: no objects at all."""
        old = self.log_objects(rel, kind)
        path = local_dir / _LOGS[kind][0]
        name = f"{self._prefix(rel, kind)}/{_seq()}.base"
        if path.exists():
            self.put_file(path, name)
        elif kind == "journal":
            self.put(name, b"")
        for obj in old:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.fs.delete_file(obj)

    def push_spend(self, rel: str, local_dir: Path) -> None:
        """The local spend log (just folded or added to) as the store's."""
        self.push_base(rel, local_dir, "spend")

    def push_dropped(self, local_dir: Path) -> None:
        """`dropped.jsonl`, whole, once a resume has added to it (before the journal that lost them is put)."""
        path = local_dir / DROPPED
        if path.exists():
            self.put_file(path, DROPPED)

    def drop_tree(self, rel: str) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            self.fs.delete_dir_contents(self._path(rel), missing_dir_ok=True)

    def drop_state(self) -> None:
        """The whole state (`--fresh`), but for the job's lease, which this run holds (`lease.py`)."""
        from .lease import NAME

        lease = self._path(NAME)
        for info in self._list("", recursive=True):
            if info.type == pafs.FileType.File and info.path != lease:
                with contextlib.suppress(OSError, pa.ArrowException):
                    self.fs.delete_file(info.path)

    def shard_dirs(self) -> list[str]:
        """The shards' folders, from the objects under them: a store has no folders, and a listing of one level
        shows them only where the filesystem makes them up from the names (pyarrow's GCS does not: a
        distributed run on gs:// merged no shard and wrote an empty output)."""
        root = self._path("shards") + "/"
        names = {i.path[len(root):].partition("/")[0] for i in self._list("shards", recursive=True)
                 if i.type == pafs.FileType.File and i.path.startswith(root) and "/" in i.path[len(root):]}
        return sorted(names)

    # -- the whole state ------------------------------------------------------------------------------------

    def pull(self) -> None:
        """The store's state over the staging copy: run.json, budget.json, dropped.jsonl, the job's and the
        shards' journals and spend logs. A job the store does not hold (no run.json) keeps nothing local."""
        self.local.mkdir(parents=True, exist_ok=True)
        found = False
        for name in _SMALL:
            try:
                data = self._read(self._path(name))
            except (OSError, pa.ArrowException):
                with contextlib.suppress(FileNotFoundError):
                    (self.local / name).unlink()
                continue
            found = found or name == "run.json"
            (self.local / name).write_bytes(data)
        self._pull_file(DROPPED)
        self.pull_journal("", self.local)
        if (self.local / "journal.jsonl").stat().st_size == 0:
            (self.local / "journal.jsonl").unlink()
        self.pull_log("", self.local, "spend", keep_extension=found)
        import shutil

        shutil.rmtree(self.local / "shards", ignore_errors=True)
        for name in self.shard_dirs():
            self.pull_journal(f"shards/{name}", self.local / "shards" / name)
            self.pull_spend(f"shards/{name}", self.local / "shards" / name)
        plan = self._path("shards/plan.json")
        with contextlib.suppress(OSError, pa.ArrowException):
            (self.local / "shards" / "plan.json").write_bytes(self._read(plan))

    def _pull_file(self, name: str) -> None:
        """A whole file of the state (streamed), or none when the store has none."""
        path = self.local / name
        tmp = self.local / f"{name}.pull.tmp"
        try:
            if self.fs.get_file_info(self._path(name)).type == pafs.FileType.NotFound:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return
            with self.fs.open_input_stream(self._path(name)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        except (OSError, pa.ArrowException) as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise self._fail(f"read {name} in", exc) from None
        os.replace(tmp, path)

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
            self.push_spend(f"shards/{d.name}", d)
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


class MirroredSpendLog(SpendLog):
    """A spend log whose lines also go to the store, as `spend/SEQ.log` segments: what was written in the last
    `interval` (0.1 s), one PUT, from a thread (`upload_periodically`), so a call's wait is not a PUT's. A
    machine lost outright may leave its last 0.1 s of lines off the store; a process killed on it does not (the
    staging copy that extends the store's is kept: `Mirror.pull_spend`)."""

    def __init__(self, directory: Path, mirror: Mirror, rel: str) -> None:
        super().__init__(directory)
        self.mirror = mirror
        self.prefix = f"{rel}/spend" if rel else "spend"
        self._pending: list[bytes] = []
        self._guard = threading.Lock()
        self._dirty: anyio.Event | None = None
        self.uploads = 0

    def write(self, line: bytes) -> None:
        super().write(line)
        with self._guard:
            self._pending.append(line)
        if self._dirty is not None:
            self._dirty.set()

    def upload(self) -> None:
        with self._guard:
            data, self._pending = b"".join(self._pending), []
        if data:
            self.mirror.put(f"{self.prefix}/{_seq()}.log", data)
            self.uploads += 1

    async def upload_periodically(self, interval: float) -> None:
        """Until cancelled: after a line, wait `interval` for more, then one PUT (in a thread) for all of them."""
        self._dirty = anyio.Event()
        if self._pending:
            self._dirty.set()
        try:
            while True:
                await self._dirty.wait()
                await anyio.sleep(interval)
                self._dirty = anyio.Event()
                await anyio.to_thread.run_sync(self.upload)
        finally:
            self._dirty = None

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OutputError):
            self.upload()


def local_scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="batcher-shard-"))
