"""Where input, output and state live: a local path, or an `s3://` / `gs://` URI, through pyarrow's filesystems.

The spec keeps every location as a `Path`; a URI written in it survives as one with its `//` folded
(`s3:/bucket/key`), which no local path a user writes looks like, so `uri_of` recovers it. The filesystem is
resolved here, at the edge, and nowhere else.

S3: the endpoint comes from `AWS_ENDPOINT_URL` (an S3-compatible server) and the credentials from the AWS
SDK's usual chain (variables, `~/.aws/credentials`, profiles, instance roles); this module never reads,
stores or prints a secret, and errors name only the bucket and key. GCS: Google's default credentials, or
with `STORAGE_EMULATOR_HOST` set (as for Google's SDKs) that emulator, anonymously.

    fs, path = filesystem("s3://bucket/data/*.parquet")
    for line, offset in iter_lines("s3://bucket/x.jsonl", start=0, end=1 << 20): ...
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import InputError

__all__ = [
    "expand_inputs",
    "filesystem",
    "folder_suffixes",
    "identity",
    "is_remote",
    "iter_lines",
    "location",
    "open_input",
    "shown",
    "upload",
    "uri_of",
]

_SCHEMES = ("s3", "gs", "gcs")
_FOLDED = re.compile(r"^(s3|gs|gcs):/+([^/].*)$")
_GLOB = re.compile(r"[*?\[]")


def uri_of(path: str | os.PathLike[str]) -> str | None:
    """The URI a spec path stands for (`s3:/b/k` and `s3://b/k` alike), or None for a local path."""
    m = _FOLDED.match(os.fspath(path))
    return f"{m.group(1)}://{m.group(2)}" if m else None


def shown(path: str | os.PathLike[str]) -> str:
    """A location as a message shows it: the URI with its `//` (one that can be copied), or the local path."""
    return uri_of(path) or os.fspath(path)


def is_remote(path: str | os.PathLike[str]) -> bool:
    return uri_of(path) is not None


def location(path: str | os.PathLike[str]) -> str:
    """A canonical text for a location: the URI, or the absolute local path (for fingerprints and messages)."""
    uri = uri_of(path)
    return uri if uri is not None else str(Path(path).resolve())


@functools.lru_cache(maxsize=8)
def _s3(region: str | None, endpoint: str | None) -> pafs.FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    # An S3-compatible server needs a region but has no real one; AWS's own default keeps the SDK happy.
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def filesystem(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    uri = uri_of(path)
    if uri is None:
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        fs = _s3(os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                 os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        return fs, rest
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return _gcs_emulator(emulator), rest
    try:
        fs, inner = pafs.FileSystem.from_uri(f"gs://{rest}")
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(f"cannot open {uri}: {_clean(exc)}") from None
    return fs, inner


@functools.lru_cache(maxsize=4)
def _gcs_emulator(host: str) -> pafs.FileSystem:
    """A GCS emulator (`STORAGE_EMULATOR_HOST`, as Google's SDKs read it: `http://127.0.0.1:9023`): no
    credentials, plain HTTP unless the address says https."""
    scheme = "https" if host.startswith("https://") else "http"
    address = host.split("://", 1)[-1].rstrip("/")
    return pafs.GcsFileSystem(endpoint_override=address, scheme=scheme, anonymous=True)


# What a store's refusal means, from the SDKs' error texts (pyarrow passes the AWS SDK's and Google's on).
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|HTTP status 403|PERMISSION_DENIED|Forbidden", re.I)
_REFUSED = re.compile(r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|"
                      r"EXPIRED_TOKEN|ExpiredToken|UNAUTHENTICATED|HTTP status 401", re.I)
_NO_CREDENTIALS = re.compile(r"no (valid )?credentials|credentials? (were )?not found|unable to locate credentials|"
                             r"could not (create|load).*credentials|default credentials", re.I)
_UNREACHABLE = re.compile(r"NETWORK_CONNECTION|curlCode|Couldn't connect|Could not resolve|Connection refused", re.I)


def _clean(exc: BaseException) -> str:
    """What went wrong, in words, without anything that looks like a credential: an access refusal says so
    (and where the credentials come from), else the SDK's first line."""
    text = str(exc)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    first = text.splitlines()[0] if text else type(exc).__name__
    if _NO_CREDENTIALS.search(text):
        return f"no usable credentials in this process's environment ({first})"
    if _REFUSED.search(text):
        return f"the store refused the credentials in this process's environment ({first})"
    if _DENIED.search(text):
        return (f"access denied: the credentials in this process's environment are missing or not allowed "
                f"to do this ({first})")
    if _UNREACHABLE.search(text):
        return f"the store cannot be reached ({first})"
    return first


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """An object store's failure while reading the input, as one line naming the URI (exit 3)."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read {uri}: {_clean(exc)}") from None


def open_input(path: str | os.PathLike[str]) -> Any:
    """A seekable binary file: a local file as Python opens it (fast line iteration), a remote one from pyarrow."""
    uri = uri_of(path)
    if uri is None:
        return open(path, "rb")
    fs, inner = filesystem(uri)
    with _reading(uri):
        return fs.open_input_file(inner)


def upload(local: Path, uri: str) -> None:
    """A finished local file to its place on the store (one PUT: readers see all of it or nothing)."""
    from .errors import OutputError

    if local.is_dir():  # a folder of parts: each one, then no stale part of an earlier write
        names = {p.name for p in local.iterdir() if p.is_file()}
        for name in sorted(names):
            upload(local / name, f"{uri}/{name}")
        fs, inner = filesystem(uri)
        with contextlib.suppress(OSError, pa.ArrowException):
            for info in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
                if info.base_name not in names:
                    fs.delete_file(info.path)
        return
    fs, inner = filesystem(uri)
    try:
        with open(local, "rb") as src, fs.open_output_stream(inner) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot write the output {uri}: {_clean(exc)}") from None


def identity(path: str) -> dict[str, Any]:
    """What names a file's content cheaply (see `sinks.input_identity`); for an object, its size and time."""
    uri = uri_of(path)
    if uri is None:
        from .sinks import _file_identity

        return {"path": path, **_file_identity(Path(path))}
    fs, inner = filesystem(uri)
    with _reading(uri):
        info = fs.get_file_info(inner)
    return {"path": uri, "size": info.size, "mtime_ns": info.mtime_ns}


def size_of(path: str | os.PathLike[str]) -> int:
    uri = uri_of(path)
    if uri is None:
        return os.path.getsize(path)
    fs, inner = filesystem(uri)
    with _reading(uri):
        info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise InputError(f"input {uri} does not exist")
    return int(info.size)


def expand_inputs(path: str | os.PathLike[str], suffixes: tuple[str, ...]) -> list[str] | None:
    """The files an input path names when it is a directory or a glob, sorted by name; None for a single file.

    A directory means its files with one of `suffixes` (hidden files and batcher's own state skipped), not
    recursively; a glob (`*`, `?`, `[...]` in the last part) means the matching files."""
    text = os.fspath(path)
    uri = uri_of(text)
    if uri is None:
        p = Path(text)
        if _GLOB.search(p.name):
            parent = p.parent
            if _GLOB.search(str(parent)):
                raise InputError(f"input.path {text}: only the last part of a path may be a glob")
            found = sorted(str(q) for q in parent.glob(p.name) if q.is_file() and not q.name.startswith("."))
        elif p.is_dir():
            found = sorted(str(q) for q in p.iterdir()
                           if q.is_file() and not q.name.startswith(".") and q.suffix.lower() in suffixes)
            if not found:
                raise InputError(f"input path {text} is not a file, and the folder holds no {'/'.join(suffixes)} file")
        else:
            return None
        if not found:
            raise InputError(f"input.path {text} matches no file")
        return found
    fs, inner = filesystem(uri)
    scheme = uri.partition("://")[0]
    base, _, name = inner.rpartition("/")
    try:
        if _GLOB.search(name):
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
            keep = [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, name)]
        else:
            info = fs.get_file_info(inner)
            if info.type != pafs.FileType.Directory:
                return None
            infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=False))
            keep = [i for i in infos if i.type == pafs.FileType.File
                    and not i.base_name.startswith(".") and os.path.splitext(i.base_name)[1].lower() in suffixes]
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read {uri}: {_clean(exc)}") from None
    found = sorted(f"{scheme}://{i.path}" for i in keep)
    if not found:
        raise InputError(f"input.path {uri} matches no file")
    return found


@functools.lru_cache(maxsize=16)
def folder_suffixes(uri: str) -> frozenset[str]:
    """The suffixes (lower case) of the files directly in a folder on a store: a prefix with objects under it,
    as `s3://bucket/reviews/` is; empty when there is none. A store's failure is the input's (exit 3)."""
    fs, inner = filesystem(uri)
    with _reading(uri):
        infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), allow_not_found=True))
    return frozenset(os.path.splitext(i.base_name)[1].lower() for i in infos
                     if i.type == pafs.FileType.File and not i.base_name.startswith("."))


def iter_lines(path: str | os.PathLike[str], start: int = 0, end: int | None = None,
               block: int = 1 << 20) -> Iterator[bytes]:
    """The lines (with their newline) that begin in the byte range [start, end) of a file.

    A range owns every line whose first byte lies in it, so line-aligned ranges can be cut by size alone, on
    the driver, without reading: a reader whose range starts mid-line skips to the next line start, and the
    reader before it reads past its end to finish its last line."""
    with open_input(path) as f:
        if isinstance(f, pa.NativeFile):
            skip = False
            if start > 0:
                f.seek(start - 1)
                skip = f.read(1) != b"\n"  # mid-line: that line belongs to the range before
            else:
                f.seek(0)
            yield from _native_lines(f, end, block, skip_first=skip)
            return
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()
        pos = f.tell()
        for raw in f:
            if end is not None and pos >= end:
                return
            pos += len(raw)
            yield raw


def _native_lines(f: Any, end: int | None, block: int, *, skip_first: bool) -> Iterator[bytes]:
    pos = f.tell()  # the offset of `buf`'s first byte
    buf = b""
    skipping = skip_first
    while True:
        chunk = f.read(block)
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[: nl + 1], buf[nl + 1:]
            line_start = pos
            pos += len(line)
            if skipping:
                skipping = False
                continue
            if end is not None and line_start >= end:
                return
            yield line
        if not chunk:
            if buf and not skipping and (end is None or pos < end):
                yield buf
            return
