"""The release reader and Parquet export against a real S3 server (SeaweedFS)."""

import pytest

from mllmcl import storage
from mllmcl.data import load_image, load_stream
from mllmcl.data.parquet import export_split, read_table, table_to_samples
from mllmcl.errors import DataError

pytestmark = pytest.mark.s3


def _strip(stream):
    return [[(s.uid, s.question, s.answer, s.image_rel, dict(s.meta)) for s in t.train + t.test] for t in stream]


def test_reader_loads_the_same_from_s3(fixture_release, s3_bucket):
    storage.upload_dir(str(fixture_release), f"{s3_bucket}/MLLM-CL")
    for name, tasks in (("dcl", ["RS", "Med"]), ("acl", ["OCR", "VP"])):
        remote = load_stream(f"{s3_bucket}/MLLM-CL", name, tasks=tasks, verify_images="decode")
        local = load_stream(str(fixture_release), name, tasks=tasks)
        assert _strip(remote) == _strip(local)
        assert remote.tasks[0].test[0].image.startswith(s3_bucket)
        assert load_image(remote.tasks[0].test[0].image).size == (24, 24)


def test_missing_image_on_s3_is_named(fixture_release, s3_bucket, tmp_path):
    import shutil

    local = tmp_path / "rel"
    shutil.copytree(fixture_release, local)
    (local / "Domain_data/RS/images/P0002_0001.png").unlink()
    storage.upload_dir(str(local), f"{s3_bucket}/rel")
    with pytest.raises(DataError, match="P0002_0001.png' not found"):
        load_stream(f"{s3_bucket}/rel", "dcl", tasks=["RS"])
    with pytest.raises(FileNotFoundError):  # a missing key is not a storage failure
        storage.read_bytes(f"{s3_bucket}/rel/Domain_data/RS/images/P0002_0001.png")


def test_parquet_export_to_s3(fixture_release, s3_bucket):
    task = load_stream(str(fixture_release), "acl", tasks=["OCR"]).tasks[0]
    uri = f"{s3_bucket}/exports/ocr_test.parquet"
    export_split(task, "test", uri)
    assert table_to_samples(read_table(uri)) == list(task.test)


def test_large_object_round_trip(s3_bucket, tmp_path):
    """A file above the multipart threshold uploads and reads back intact."""
    import os

    data = os.urandom(12 * 1024 * 1024)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "weights.bin").write_bytes(data)
    storage.upload_dir(str(tmp_path / "big"), f"{s3_bucket}/big")
    assert storage.read_bytes(f"{s3_bucket}/big/weights.bin") == data
    storage.write_bytes(f"{s3_bucket}/big/copy.bin", data)
    assert storage.read_bytes(f"{s3_bucket}/big/copy.bin") == data
    assert storage.list_dir(f"{s3_bucket}/big") == ["copy.bin", "weights.bin"]
