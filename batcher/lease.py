"""One run of a job at a time across machines, for a job whose state is on S3: a lease object on the store.

The local lock (`sinks.JobLock`, a `flock`) keeps two runs on one machine apart; machines share only the store.
S3's conditional writes make a lease there sound without a server of our own: `PutObject` with
`If-None-Match: *` creates the lease only if there is none, and with `If-Match: <ETag>` replaces it only if it
is still the version read, so of two machines racing for it exactly one wins.

    lease = s3_lease("s3://bucket/out/.o.parquet.batcher", local_lock=state / "lock")
    if not lease.try_acquire():
        raise lease.refusal()        # exit 8, naming the holder
    ...                              # a thread renews it every RENEW_S; `lease.lost` says if it was taken
    lease.release()                  # deleted, only if it is still ours

The lease object (`lease.json` in the state folder) names its holder (pid, host, start time, the local lock
it holds beside it) and is renewed every `RENEW_S` seconds; each renewal changes its content, so its ETag. A
lease not renewed for `TTL_S` (by the store's clock: its `Last-Modified` against the `Date` of the reply that
read it, so the machines' clocks never meet) is stale, and another run takes it over with `If-Match`; so is one
whose holder ran on this host under the local lock this run now holds (that process is gone: a `kill -9` here
need not wait out the TTL). A holder that cannot renew for `TTL_S`, or finds its lease replaced, has lost it
(`lost`): the runner stops before it sends more or writes the output.

The requests go through boto3 (`pip install 'batcher[s3]'`), which pyarrow's S3 filesystem cannot replace: it
sends no conditional headers. Without boto3 `s3_lease` returns None and the job is locked on this machine only.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import JobLockedError, OutputError

__all__ = ["RENEW_S", "TTL_S", "S3Lease", "s3_lease"]

TTL_S = 60.0  # a lease not renewed for this long may be taken over
RENEW_S = 15.0  # how often its holder renews it: three renewals may fail before it goes stale
NAME = "lease.json"


def s3_lease(state_uri: str, local_lock: Path) -> S3Lease | None:
    """The lease for a job whose state is at `state_uri` (an `s3://` folder), or None where there can be none
    (another store, or boto3 not installed)."""
    if not state_uri.startswith("s3://"):
        return None
    try:
        import boto3  # noqa: F401
    except ImportError:
        return None
    return S3Lease(f"{state_uri.rstrip('/')}/{NAME}", local_lock, ttl=TTL_S, renew=RENEW_S)


def _client() -> Any:
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(connect_timeout=10, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _conflict(exc: BaseException) -> bool:
    """The store refused a conditional write: another version is there (412), or a write raced ours (409)."""
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _missing(exc: BaseException) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound")


class S3Lease:
    def __init__(self, uri: str, local_lock: Path, ttl: float = TTL_S, renew: float = RENEW_S,
                 client: Any = None) -> None:
        self.uri = uri
        self.bucket, _, self.key = uri.removeprefix("s3://").partition("/")
        self.local_lock = str(local_lock.resolve())
        self.ttl = ttl
        self.renew_every = renew
        self._client = client
        self.token = uuid.uuid4().hex
        self.started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.etag: str | None = None
        self.held = False
        self.lost: str | None = None  # why this run no longer holds the lease
        self.renewals = 0
        self._seen: dict[str, Any] = {}  # the other holder's record, and how long ago it renewed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client()
        return self._client

    def _body(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                           "local_lock": self.local_lock, "token": self.token, "ttl_s": self.ttl,
                           "renewals": self.renewals}).encode()

    def _fail(self, what: str, exc: BaseException) -> OutputError:
        from .storage import _clean

        return OutputError(f"cannot {what} the job's lease {self.uri}: {_clean(exc)}")

    def _put(self, **condition: str) -> str:
        reply = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                       ContentType="application/json", **condition)
        return str(reply["ETag"])

    # -- taking it ------------------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the lease if there is none or it is stale (and start renewing it); False if another run holds
        it (`refusal()` names that run). Called with the local lock beside it held."""
        if self.held:
            return True
        from botocore.exceptions import BotoCoreError, ClientError

        for _ in range(3):  # a lease released or replaced between our reads: look again
            try:
                self._hold(self._put(IfNoneMatch="*"))
                return True
            except ClientError as exc:
                if not _conflict(exc):
                    raise self._fail("take", exc) from None
            except BotoCoreError as exc:
                raise self._fail("take", exc) from None
            try:
                reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
                data = reply["Body"].read()
            except ClientError as exc:
                if _missing(exc):
                    continue  # released meanwhile
                raise self._fail("read", exc) from None
            except BotoCoreError as exc:
                raise self._fail("read", exc) from None
            if not self._stale(reply, data):
                return False
            try:
                self._hold(self._put(IfMatch=str(reply["ETag"])))
                return True
            except ClientError as exc:
                if not (_conflict(exc) or _missing(exc)):
                    raise self._fail("take over", exc) from None
            except BotoCoreError as exc:
                raise self._fail("take over", exc) from None
        return False

    def _stale(self, reply: dict[str, Any], data: bytes) -> bool:
        try:
            info = json.loads(data)
            assert isinstance(info, dict)
        except (ValueError, AssertionError):
            info = {}
        now = email.utils.parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = max(0.0, (now - reply["LastModified"]).total_seconds())
        self._seen = {**info, "age": age}
        ttl = info.get("ttl_s") if isinstance(info.get("ttl_s"), int | float) else self.ttl
        if age > ttl:
            return True
        # The holder ran here, under the local lock this process now holds: it is gone (the flock died with it)
        return bool(info.get("host") == socket.gethostname() and info.get("local_lock") == self.local_lock)

    def _hold(self, etag: str) -> None:
        self.etag, self.held, self.lost = etag, True, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="batcher-lease", daemon=True)
        self._thread.start()

    # -- keeping it -----------------------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        last = time.monotonic()
        while not self._stop.wait(self.renew_every):
            self.renewals += 1
            try:
                self.etag = self._put(IfMatch=str(self.etag))
                last = time.monotonic()
            except ClientError as exc:
                if _conflict(exc) or _missing(exc):
                    self.lost = "its lease was taken over by another run"
                    return
                if time.monotonic() - last > self.ttl:
                    self.lost = f"it could not renew its lease for {self.ttl:g} s"
                    return
            except BotoCoreError:
                if time.monotonic() - last > self.ttl:
                    self.lost = f"it could not renew its lease for {self.ttl:g} s"
                    return

    def lost_error(self) -> JobLockedError:
        return JobLockedError(
            f"this run stopped: {self.lost} ({self.uri}), so another run of the job may be going on; what was "
            "answered is in the journal. Rerun the same command once that run ends (or with --wait)")

    # -- telling and letting go ---------------------------------------------------------------------------

    def holder(self) -> str:
        info = self._seen
        if not info.get("pid"):
            return "a run whose lease cannot be read"
        ttl = info.get("ttl_s", self.ttl)
        return (f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}, its lease "
                f"renewed {info['age']:.0f} s ago (taken over once not renewed for {ttl:g} s)")

    def refusal(self) -> JobLockedError:
        return JobLockedError(
            f"another run of this job holds its lease ({self.uri}): {self.holder()}. Let it finish (or stop it), "
            "or rerun with --wait to start as soon as it ends")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.held and self.lost is None and self.etag is not None:
            from botocore.exceptions import BotoCoreError, ClientError

            with contextlib.suppress(ClientError, BotoCoreError):  # the lease then goes stale by itself
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        self.held = False
