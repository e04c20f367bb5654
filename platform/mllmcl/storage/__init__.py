"""One interface over local folders and ``s3://`` prefixes (pyarrow filesystems).

S3 endpoint and credentials come from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``) and are never logged.
"""

from mllmcl.storage.fs import (
    delete,
    delete_dir,
    exists,
    filesystem_for,
    is_dir,
    is_remote,
    join,
    list_dir,
    modified,
    read_bytes,
    read_json,
    read_text,
    write_bytes,
    write_json,
    write_text,
    upload_dir,
    download_dir,
)

__all__ = [
    "delete",
    "delete_dir",
    "exists",
    "filesystem_for",
    "is_dir",
    "is_remote",
    "join",
    "list_dir",
    "modified",
    "read_bytes",
    "read_json",
    "read_text",
    "write_bytes",
    "write_json",
    "write_text",
    "upload_dir",
    "download_dir",
]
