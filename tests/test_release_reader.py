"""The release reader: real-layout fixture, synthetic twin, and bad input."""

import json
import shutil

import pytest

from mllmcl.data import load_image, load_stream, load_task
from mllmcl.data.parquet import export_split, read_table, table_to_samples
from mllmcl.errors import DataError


def test_reads_domain_fixture(fixture_release):
    stream = load_stream(str(fixture_release), "dcl", tasks=["RS", "Med"])
    assert stream.task_names == ["RS", "Med"]
    rs = stream.task("RS")
    # the multi-turn record becomes one sample per turn
    assert [s.uid for s in rs.train] == ["rs_train_0", "rs_train_1#0", "rs_train_1#1"]
    assert rs.train[0].question == "Is there a water area in the image?"
    assert rs.train[0].answer == "no"
    assert rs.train[2].question == "Is it a rural or an urban area?"
    assert rs.test[0].meta == {"category": "presence"}
    # an image path given relative to images/ resolves too
    assert rs.test[1].image.endswith("RS/images/P0001_0001.png")
    med = stream.task("Med")
    assert med.test[0].uid == "7" and med.test[0].question == "What is present?"
    assert load_image(med.test[0].image).mode == "RGB"


def test_reads_ability_fixture_with_separate_test_folders(fixture_release):
    stream = load_stream(str(fixture_release), "acl", tasks=["OCR", "VP"])
    ocr = stream.task("OCR")
    assert ocr.test[0].answers == ("STOP", "stop sign")
    assert ocr.test[0].meta["answer_type"] == "Regular Text Recognition"
    assert "OCR_test/images/" in ocr.test[0].image
    vp = stream.task("VP")
    assert vp.test[0].meta == {"type": "2D", "task": "Count"}


def test_synthetic_twin_reads_like_the_release(synthetic_small):
    for name, n_tasks in (("dcl", 5), ("acl", 4)):
        stream = load_stream(str(synthetic_small), name, verify_images="decode")
        assert len(stream) == n_tasks
        for task in stream:
            assert len(task.train) == 12 and len(task.test) == 6
            assert all(s.question and s.target for s in task.train)
    ocr = load_task(str(synthetic_small), "acl", "OCR")
    assert isinstance(ocr.test[0].answer, tuple)  # OCRBench-style list answers
    sci = load_task(str(synthetic_small), "dcl", "Sci")
    assert all(s.image_rel.split("/")[-1].startswith("AI2D_") for s in sci.test)


def test_accepts_the_stream_folder_as_root(fixture_release):
    a = load_task(str(fixture_release / "Domain_data"), "dcl", "RS")
    b = load_task(str(fixture_release), "dcl", "RS")
    assert [s.uid for s in a.test] == [s.uid for s in b.test]


def test_parquet_export_round_trips(fixture_release, tmp_path):
    task = load_task(str(fixture_release), "acl", "OCR")
    table = export_split(task, "test", str(tmp_path / "ocr_test.parquet"))
    assert table.num_rows == 2
    back = table_to_samples(read_table(str(tmp_path / "ocr_test.parquet")))
    assert back == list(task.test)


# --------------------------------------------------------------------------- bad input

@pytest.fixture()
def editable_release(fixture_release, tmp_path):
    dst = tmp_path / "release"
    shutil.copytree(fixture_release, dst)
    return dst


def test_missing_image_names_file_and_record(editable_release):
    (editable_release / "Domain_data/RS/images/P0002_0001.png").unlink()
    with pytest.raises(DataError) as e:
        load_stream(str(editable_release), "dcl", tasks=["RS"])
    msg = str(e.value)
    assert "RS/test.json" in msg and "rs_q0" in msg and "P0002_0001.png" in msg and "not found" in msg


def test_malformed_json_names_file_and_line(editable_release):
    path = editable_release / "Domain_data/Med/train.json"
    path.write_text(path.read_text().replace('"id"', '"id', 1))
    with pytest.raises(DataError, match=r"Med/train.json: malformed JSON at line \d+"):
        load_task(str(editable_release), "dcl", "Med")


def test_test_record_without_answer_names_field(editable_release):
    path = editable_release / "Domain_data/RS/test.json"
    records = json.loads(path.read_text())
    del records[1]["answer"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as e:
        load_task(str(editable_release), "dcl", "RS")
    assert "RS/test.json" in str(e.value) and "rs_q1" in str(e.value) and "'answer'" in str(e.value)


def test_every_problem_of_every_task_is_listed(editable_release):
    (editable_release / "Domain_data/RS/images/P0000_0001.png").unlink()
    (editable_release / "Domain_data/Med/test.json").write_text("[{\"question_id\": 1}]")
    with pytest.raises(DataError) as e:
        load_stream(str(editable_release), "dcl", tasks=["RS", "Med"])
    msg = str(e.value)
    assert "RS/train.json" in msg and "Med/test.json" in msg


def test_unknown_task_and_stream(fixture_release):
    with pytest.raises(DataError, match=r"unknown task\(s\) \['Geo'\]"):
        load_stream(str(fixture_release), "dcl", tasks=["RS", "Geo"])
    with pytest.raises(KeyError, match="unknown stream 'ccl'"):
        load_stream(str(fixture_release), "ccl")


def test_missing_task_folder(fixture_release):
    with pytest.raises(DataError, match="AD: task folder for dcl/AD not found"):
        load_task(str(fixture_release), "dcl", "AD")


def test_corrupt_image_is_named(editable_release):
    bad = editable_release / "Domain_data/Med/images/med_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    task = load_task(str(editable_release), "dcl", "Med")  # existence check passes
    with pytest.raises(DataError, match="med_1.png: corrupt or unsupported image"):
        load_image(task.test[0].image)
    with pytest.raises(DataError, match="med_1.png: corrupt"):
        load_task(str(editable_release), "dcl", "Med", verify_images="decode")
