"""Storage failures: an S3 request that fails after its retries is one StorageError naming the
request; a missing key and every local error keep their own types."""

import socket

import pytest

from mllmcl import storage
from mllmcl.errors import MllmclError, StorageError


@pytest.fixture()
def unreachable_s3(monkeypatch):
    """An S3 endpoint whose port refuses connections (nothing listens there), one attempt per request."""
    from mllmcl.storage.fs import _s3_client, _s3_filesystem

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                 "AWS_REGION": "us-east-1", "MLLMCL_S3_MAX_ATTEMPTS": "1", "MLLMCL_S3_TIMEOUT_S": "2"}.items():
        monkeypatch.setenv(k, v)
    yield
    _s3_filesystem.cache_clear()
    _s3_client.cache_clear()


def test_an_unreachable_s3_server_is_one_storage_error_naming_the_request(unreachable_s3, tmp_path):
    calls = [("read_bytes", lambda u: storage.read_json(u)), ("write_bytes", lambda u: storage.write_json(u, {})),
             ("exists", storage.exists), ("list_dir", storage.list_dir), ("delete", storage.delete),
             ("upload_dir", lambda u: storage.upload_dir(str(tmp_path), u)),
             ("download_dir", lambda u: storage.download_dir(u, str(tmp_path / "down")))]
    (tmp_path / "a.json").write_text("{}")
    for op, call in calls:
        uri = f"s3://bucket/run/{op}"
        with pytest.raises(StorageError) as e:
            call(uri)
        assert str(e.value).startswith(f"storage: {op} {uri} failed after 1 attempt(s)"), str(e.value)
        assert isinstance(e.value, OSError) and isinstance(e.value, MllmclError)  # callers catching either see it


def test_local_errors_keep_their_types(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.json"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        storage.write_text(str(tmp_path / "file" / "below.json"), "{}")  # a file where a folder should be
    assert not isinstance(e.value, StorageError)
