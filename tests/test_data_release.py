"""The checksum manifest of a data release: content-only (a local and an S3 copy agree),
sensitive to an edited annotation file or a changed image, recorded in a run, and a run
resumed on changed data is refused with the files that changed."""

from __future__ import annotations

import json
import shutil

import pytest

from mllmcl import storage
from mllmcl.config import load_config
from mllmcl.data import load_stream
from mllmcl.data.checksums import release_changes, release_manifest
from mllmcl.errors import ConfigError


@pytest.mark.s3
def test_manifest_is_about_content_not_location(fixture_release, s3_bucket):
    local = release_manifest(load_stream(str(fixture_release), "acl", tasks=["OCR", "VP"]), hash_images=True)
    storage.upload_dir(str(fixture_release), f"{s3_bucket}/MLLM-CL")
    remote = release_manifest(load_stream(f"{s3_bucket}/MLLM-CL", "acl", tasks=["OCR", "VP"]), hash_images=True)
    assert local["digest"] == remote["digest"] and release_changes(local, remote) == []
    ocr = local["tasks"]["OCR"]
    assert ocr["test"]["folder"].endswith("OCR_test") and ocr["test"]["annotation"]["file"] == "test.json"
    assert ocr["train"]["images"]["count"] > 0 and len(ocr["train"]["annotation"]["sha256"]) == 64


def test_manifest_sees_edits(fixture_release, tmp_path):
    copy = tmp_path / "release"
    shutil.copytree(fixture_release, copy)
    before = release_manifest(load_stream(str(copy), "dcl", tasks=["RS", "Med"]))
    test_json = copy / "Domain_data" / "Med" / "test.json"
    test_json.write_text(test_json.read_text() + "\n\n")  # same records, other bytes
    image = next((copy / "Domain_data" / "RS" / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    after = release_manifest(load_stream(str(copy), "dcl", tasks=["RS", "Med"]))
    changes = release_changes(before, after)
    assert before["digest"] != after["digest"]
    assert any(c.startswith("Med/test.json: sha256") for c in changes), changes
    assert any(c.startswith("RS train images") or c.startswith("RS test images") for c in changes), changes


def test_run_records_the_release_and_refuses_changed_data(tmp_path, stream_overrides, synthetic_small):
    from mllmcl import run_stream

    data = tmp_path / "data"
    shutil.copytree(synthetic_small, data)
    overrides = [*stream_overrides, f"data.root={data}", "scaling.backend=local", "method.name=lora_ft",
                 "data.tasks=[RS,Med]", f"storage.root={tmp_path / 'out'}"]
    res = run_stream(load_config(None, overrides), "rel", stop_after=0)
    run = tmp_path / "out" / "runs" / "rel"
    recorded = json.loads((run / "data_release.json").read_text())
    import yaml

    prov = yaml.safe_load((run / "config.yaml").read_text())["provenance"]
    assert prov["data_release"]["digest"] == recorded["digest"] and set(recorded["tasks"]) == {"RS", "Med"}
    assert res.trained_stages == [0]
    train_json = data / "Domain_data" / "Med" / "train.json"
    train_json.write_text(json.dumps(json.loads(train_json.read_text())[:-1]))  # one record fewer
    with pytest.raises(ConfigError, match=r"Med/train.json: sha256"):
        run_stream(load_config(None, overrides), "rel")
    assert json.loads((run / "manifest.json").read_text())["stages"][0]["k"] == 0  # nothing lost
