"""A store that refuses us (no credentials, or credentials not allowed): one line naming the URI and why, exit 3
on the input side and 4 on the output side, no request sent, no secret printed; a Ray worker's refusal too.

The store here is a stand-in that fails every call the way pyarrow's S3 filesystem does (the AWS SDK's text):
moto's server accepts any request without credentials, so it cannot show a refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import yaml

from batcher import storage
from batcher.cli import main
from batcher.errors import InputError
from batcher.gateway import Gateway

SECRET = "s3cr3t-never-printed-0123456789"


class _Refusing:
    """Every call fails as S3 fails for a request it denies; with `listing`, the folder `b/in` may be listed
    (a policy that grants s3:ListBucket and not s3:GetObject) and only its objects are refused."""

    def __init__(self, listing: bool) -> None:
        self.listing = listing

    def get_file_info(self, what: Any) -> Any:
        if self.listing and isinstance(what, pafs.FileSelector):
            return [pafs.FileInfo("b/in/reviews.parquet", pafs.FileType.File, size=10)]
        if self.listing and what == "b/in":
            return pafs.FileInfo("b/in", pafs.FileType.Directory)
        return self.refuse()

    def refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"When getting information for key 'in/x' in bucket 'b': AWS Error ACCESS_DENIED during "
                      f"HeadObject operation: No response body. {SECRET}")

    def __getattr__(self, name: str) -> Any:
        return self.refuse


@pytest.fixture(params=[False, True], ids=["nothing", "listing"])
def refusing_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> bool:
    # No credentials anywhere the AWS SDK looks (other tests may have left a key id in the environment), and an
    # endpoint on this machine, so the lease's boto3 call can never leave it (it fails before connecting).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    try:  # boto3's default session keeps the credentials it found first (an S3 test's, earlier in the run)
        import boto3

        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    except ImportError:
        pass
    real = storage.filesystem
    listing: bool = request.param

    def filesystem(path: Any) -> Any:
        uri = storage.uri_of(path)
        return real(path) if uri is None else (_Refusing(listing), uri.partition("://")[2])

    monkeypatch.setattr(storage, "filesystem", filesystem)
    storage.folder_suffixes.cache_clear()
    return listing


def _run(make_spec, tmp_path: Path, capsys, *args: str, **sections: Any) -> tuple[int, str]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(make_spec(**sections)))
    code = main([*args, str(tmp_path / "job.yaml")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("path", ["s3://b/in/reviews.parquet", "s3://b/in/", "s3://b/in/*.parquet"])
def test_an_input_the_store_refuses_is_one_line_exit_3(make_spec, gateway: Gateway, tmp_path: Path, capsys,
                                                        refusing_store: bool, path: str) -> None:
    # validate reads no input, except to tell a folder's format from its files' suffixes
    for command in ("validate", "run") if path.endswith("/") and not refusing_store else ("run",):
        code, err = _run(make_spec, tmp_path, capsys, command, input={"path": path})
        assert code == 3, err
        assert err.count("\n") == 1 and err.startswith("batcher: error: cannot read s3://b/in"), err
        assert "Traceback" not in err
        assert "access denied" in err and SECRET not in err
    assert gateway.stats.billed == 0


@pytest.mark.usefixtures("refusing_store")
def test_an_output_the_store_refuses_is_one_line_exit_4(make_spec, gateway: Gateway, tmp_path: Path,
                                                        capsys) -> None:
    code, err = _run(make_spec, tmp_path, capsys, "run", output={"path": "s3://b/out/o.parquet"})
    assert code == 4, err
    # the lease (boto3, no credentials here) or the pyarrow store stand-in refuses first
    assert err.count("\n") == 1 and "s3://b/out/" in err, err
    assert "access denied" in err or "no usable credentials" in err, err
    assert SECRET not in err
    assert gateway.stats.billed == 0


def test_a_ray_workers_refusal_says_whose_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from batcher.distributed import _worker_input_error

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    sdk = OSError(f"When getting information for key 'in/part-2.parquet' in bucket 'hrb': AWS Error ACCESS_DENIED "
                  f"during HeadObject operation: No response body. {SECRET}")
    with pytest.raises(InputError) as raised:
        with storage._reading("s3://hrb/in/part-2.parquet"):
            raise sdk
    for error in (raised.value, sdk):
        out = _worker_input_error(error)
        assert isinstance(out, InputError) and "\n" not in str(out) and SECRET not in str(out)
        assert "access denied" in str(out) and "each Ray node needs the credentials" in str(out), out
    other = InputError("s3://hrb/in/part-2.parquet: no column 'text'")
    assert _worker_input_error(other) is other
