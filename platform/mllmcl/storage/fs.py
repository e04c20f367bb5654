"""Filesystem helpers that take either a local path or an ``s3://bucket/key`` URI."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mllmcl import chaos
from mllmcl.errors import StorageError

# answers about the key itself keep their types (a missing key is FileNotFoundError from pyarrow); a request
# that failed (pyarrow: a plain OSError naming the AWS error; boto3/botocore: their own) is a StorageError
_NOT_A_FAILURE = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, StorageError)


@lru_cache(maxsize=1)
def _failures() -> tuple[type[BaseException], ...]:
    try:
        from boto3.exceptions import Boto3Error  # S3UploadFailedError: a managed upload that failed
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError, Boto3Error)


@contextlib.contextmanager
def _s3_failures(op: str, uri: str):
    """An S3 request that failed after its retries becomes a :class:`StorageError` naming the
    operation and the URI (a missing key stays FileNotFoundError); local paths are left alone."""
    if not str(uri).startswith("s3://"):
        yield
        return
    try:
        yield
    except _NOT_A_FAILURE:
        raise
    except _failures() as e:
        detail = " ".join(str(e).split())[:500]
        raise StorageError(f"storage: {op} {uri} failed after {_s3_patience()[1]} attempt(s) "
                           f"(MLLMCL_S3_MAX_ATTEMPTS): {type(e).__name__}: {detail}") from e


def _storage_op(fn):
    """Wrap a public function whose first argument is a path or URI (see :func:`_s3_failures`)."""
    @functools.wraps(fn)
    def wrapper(uri, *args, **kwargs):
        with _s3_failures(fn.__name__, uri):
            return fn(uri, *args, **kwargs)
    return wrapper


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URIs and os.path for local paths."""
    base = str(base)
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(base, *[str(p) for p in parts])


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme = "https"
        host = endpoint
        if "://" in endpoint:
            scheme, host = endpoint.split("://", 1)
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if region:
        kwargs["region"] = region
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    timeout, attempts = _s3_patience()
    return pafs.S3FileSystem(**kwargs, connect_timeout=timeout, request_timeout=timeout,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def _s3_patience() -> tuple[float, int]:
    """(seconds one S3 request may take, attempts per request): MLLMCL_S3_TIMEOUT_S (default 30) and
    MLLMCL_S3_MAX_ATTEMPTS (default 10; AWS's standard retry mode: exponential backoff with jitter,
    at most 20 s between attempts). A storage server that stops answering for a while is waited
    for (about 5 minutes at the defaults), then the run fails with the storage error and resumes
    when resubmitted."""
    return (float(os.environ.get("MLLMCL_S3_TIMEOUT_S", "30")), int(os.environ.get("MLLMCL_S3_MAX_ATTEMPTS", "10")))


def _s3_settings() -> tuple[str | None, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


@lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None):
    """boto3 client for writes: single PUTs and managed multipart uploads."""
    import boto3
    from botocore.config import Config

    timeout, attempts = _s3_patience()
    # a session of its own: credentials are read from the environment now (boto3's default session keeps
    # the first ones it resolved in this process)
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, region_name=region,
                                          config=Config(connect_timeout=timeout, read_timeout=timeout,
                                                        retries={"mode": "standard", "max_attempts": attempts}))


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return _s3_filesystem(*_s3_settings()), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@_storage_op
def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@_storage_op
def modified(uri: str) -> int | None:
    """The file's modification time (ns), None where the filesystem does not say."""
    fs, path = filesystem_for(uri)
    mtime = fs.get_file_info(path).mtime_ns
    return int(mtime) if mtime is not None else None


@_storage_op
def is_dir(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@_storage_op
def list_dir(uri: str) -> list[str]:
    """Names (not paths) of the direct children of a folder; [] when absent."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(Path(i.path).name for i in infos)


@_storage_op
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


@_storage_op
def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a temp file renamed into place locally; one PUT on S3."""
    if str(uri).startswith("s3://"):
        bucket, key = _split_s3(str(uri))
        _s3_client(*_s3_settings()).put_object(Bucket=bucket, Key=key, Body=data)
        return
    fs, path = filesystem_for(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            chaos.point("write:" + os.path.basename(path))  # tests: a kill half-way through the write
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


@_storage_op
def delete(uri: str) -> None:
    """Remove one file if it exists (no error when it does not)."""
    if str(uri).startswith("s3://"):
        bucket, key = _split_s3(str(uri))
        _s3_client(*_s3_settings()).delete_object(Bucket=bucket, Key=key)
        return
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


@_storage_op
def delete_dir(uri: str) -> None:
    """Remove a folder tree (every object under the prefix on S3); no error when it is absent."""
    if str(uri).startswith("s3://"):
        bucket, prefix = _split_s3(str(uri).rstrip("/"))
        client = _s3_client(*_s3_settings())
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        return
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder tree to ``uri`` (local or remote)."""
    with _s3_failures("upload_dir", uri):
        _upload_dir(os.path.abspath(local_dir), uri)


def _upload_dir(local_dir: str, uri: str) -> None:
    if str(uri).startswith("s3://"):
        bucket, prefix = _split_s3(str(uri).rstrip("/"))
        client = _s3_client(*_s3_settings())
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                client.upload_file(full, bucket, f"{prefix}/{rel}" if prefix else rel)
        return
    dst_fs, dst = filesystem_for(uri)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(local_dir, dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dst_fs)


@_storage_op
def download_dir(uri: str, local_dir: str) -> None:
    """Copy a folder tree at ``uri`` into a local folder."""
    src_fs, src = filesystem_for(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(src, os.path.abspath(local_dir), source_filesystem=src_fs,
                    destination_filesystem=pafs.LocalFileSystem())
