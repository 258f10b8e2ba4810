"""Local files in message parts: an image, audio or PDF path turned into the data the contract carries, safely.

A row value is not trusted: `{{img}}` holding `/proc/self/environ` must not send the process environment (and
the API key in it) as an "image". A local path is read only when

- it resolves (symlinks followed) under one of the allowed folders: the input file's folder or the working
  directory (`Attachments.roots`; None allows any folder, for direct library use),
- it is a regular file, and not under /proc, /sys or /dev,
- it is at most `max_bytes` (input.max_attachment_bytes, 20 MB by default),
- its bytes are what the part carries, by their magic numbers (never by the file's name): PNG, JPEG, GIF or
  WebP for `image_url.url`; WAV or MP3 for `input_audio.data`; PDF for `file.file_data`.

Otherwise the row is an error row naming the part and the path. `http(s)://` and `data:` URLs pass as they are;
`input_audio.data` that is base64 already passes as it is.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .templating import TemplateError

__all__ = [
    "DEFAULT_MAX_ATTACHMENT_BYTES", "IMAGE_TOKENS", "IMAGE_TOKENS_BOUND", "AttachmentError", "Attachments", "attach",
    "media_tokens", "sniff",
]

DEFAULT_MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024
_SPECIAL = ("/proc", "/sys", "/dev")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class AttachmentError(TemplateError):
    """A part names a local file that may not be sent; the message names the part and the path."""

    def __init__(self, where: str, message: str) -> None:
        ValueError.__init__(self, f"{where}: {message}")
        self.template = where


def sniff(head: bytes) -> str | None:
    """The MIME type of a file's first bytes: the image, audio and document types parts can carry."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return None


@dataclass(frozen=True, slots=True)
class Attachments:
    """Where local files may be read from (None: anywhere but /proc, /sys, /dev) and how big they may be."""

    roots: tuple[Path, ...] | None = None
    max_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES

    @classmethod
    def for_input(cls, input_path: Path, max_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES) -> Attachments:
        roots = {Path(os.path.realpath(input_path)).parent, Path(os.path.realpath(os.getcwd()))}
        return cls(tuple(sorted(roots)), max_bytes)

    def read(self, value: str, where: str, kinds: Sequence[str]) -> tuple[str, bytes]:
        """(MIME type, bytes) of the local file `value` names, or TemplateError naming `where` and the path."""
        shown = repr(value[:200])

        def refuse(why: str) -> AttachmentError:
            return AttachmentError(where, f"{shown} {why}")

        path = Path(value).expanduser()
        real = Path(os.path.realpath(path))
        if any(str(real) == s or str(real).startswith(s + "/") for s in _SPECIAL):
            raise refuse("is a system file (/proc, /sys, /dev), never sent")
        if self.roots is not None and not any(real == r or r in real.parents for r in self.roots):
            raise refuse("is outside the folders local files are read from (the input file's folder and the "
                         "working directory)")
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        except OSError as exc:
            raise refuse(f"is neither an http(s)/data URL nor a readable file ({exc.strerror or exc})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise refuse("is not a regular file")
            if st.st_size > self.max_bytes:
                raise refuse(f"is {st.st_size:,} bytes, over input.max_attachment_bytes ({self.max_bytes:,})")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(self.max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise refuse(f"is over input.max_attachment_bytes ({self.max_bytes:,})")
        mime = sniff(data[:16])
        if mime is None or (mime.split("/")[0] not in kinds and mime not in kinds):
            raise refuse(f"is not {' or '.join(_KIND_NAMES[k] for k in kinds)} by its content "
                         f"({'unknown type' if mime is None else mime})")
        return mime, data


_KIND_NAMES = {"image": "an image (PNG, JPEG, GIF, WebP)", "audio": "audio (WAV, MP3)",
               "application/pdf": "a PDF"}


def _is_base64(value: str) -> bool:
    if len(value) % 4 or not _BASE64.fullmatch(value):
        return False
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def attach(messages: list[dict[str, Any]], prefix: str, policy: Attachments) -> list[dict[str, Any]]:
    """The messages with every local file in an image, audio or file part read (in place) as the contract's
    data. `prefix` names where the messages came from (`template input.messages`, `messages column`)."""
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            where = f"{prefix}[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "image_url" and isinstance(part.get("image_url"), dict):
                url = part["image_url"].get("url")
                if isinstance(url, str) and not url.startswith(("http://", "https://", "data:")):
                    mime, data = policy.read(url, f"{where}.image_url.url", ["image"])
                    part["image_url"] = {**part["image_url"],
                                         "url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}
            elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
                audio = part["input_audio"].get("data")
                if isinstance(audio, str) and not _is_base64(audio):
                    mime, data = policy.read(audio, f"{where}.input_audio.data", ["audio"])
                    part["input_audio"] = {**part["input_audio"], "data": base64.b64encode(data).decode()}
            elif kind == "file" and isinstance(part.get("file"), dict):
                fd = part["file"].get("file_data")
                if isinstance(fd, str) and not fd.startswith("data:"):
                    mime, data = policy.read(fd, f"{where}.file.file_data", ["application/pdf"])
                    part["file"] = {**part["file"], "filename": part["file"].get("filename") or Path(fd).name,
                                    "file_data": f"data:{mime};base64,{base64.b64encode(data).decode()}"}
    return messages


# What an attachment is counted as, since its tokens depend on the provider (and an image's on its pixels):
# `plan` estimates an image at IMAGE_TOKENS and audio or a file at its bytes / 4; the budget's prompt bound takes
# an image as IMAGE_TOKENS_BOUND (above gpt-4o-mini's high-detail ceiling of ~48,000 for a 2048 x 768 image) and
# audio or a file as one token per byte.
IMAGE_TOKENS = 1_000
IMAGE_TOKENS_BOUND = 50_000


def _data_bytes(value: Any) -> int:
    if not isinstance(value, str):
        return 0
    return len(value.partition(",")[2] if value.startswith("data:") else value) * 3 // 4


def media_tokens(body: Any) -> tuple[int, int, int]:
    """(attachments, estimated tokens, bound on tokens) of the image, audio and file parts of a chat body."""
    count = est = bound = 0
    messages = body.get("messages") if isinstance(body, dict) else None
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "image_url":
                count, est, bound = count + 1, est + IMAGE_TOKENS, bound + IMAGE_TOKENS_BOUND
            elif kind in ("input_audio", "file"):
                inner = part.get(kind)
                if not isinstance(inner, dict):
                    continue
                n = _data_bytes(inner.get("data" if kind == "input_audio" else "file_data"))
                count, est, bound = count + 1, est + n // 4, bound + n
    return count, est, bound
