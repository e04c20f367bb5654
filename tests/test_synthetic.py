"""The synthetic twins: deterministic, in the release layout, overlapping vocabularies."""

import hashlib
from pathlib import Path

from mllmcl.data import load_stream
from mllmcl.data.synthetic import SyntheticSpec, ensure_synthetic, write_synthetic


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = SyntheticSpec(n_train=5, n_test=3, image_size=40, seed=1, streams=("dcl",))
    a = write_synthetic(tmp_path / "a", spec, progress=False)
    b = write_synthetic(tmp_path / "b", spec, progress=False)
    c = write_synthetic(tmp_path / "c", SyntheticSpec(n_train=5, n_test=3, image_size=40, seed=2, streams=("dcl",)),
                        progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_matches_the_release(synthetic_small):
    for t in ("RS", "Med", "AD", "Sci", "Fin"):
        d = synthetic_small / "Domain_data" / t
        assert (d / "train.json").is_file() and (d / "test.json").is_file() and (d / "images").is_dir()
    for t in ("OCR", "Math", "VP", "APP"):
        assert (synthetic_small / "Ability_data" / t / "train.json").is_file()
        assert (synthetic_small / "Ability_data" / f"{t}_test" / "test.json").is_file()
        assert not (synthetic_small / "Ability_data" / t / "test.json").exists()


def test_answer_vocabularies_overlap_across_tasks(tmp_path):
    root = write_synthetic(tmp_path, SyntheticSpec(n_train=150, n_test=2, seed=0), progress=False)
    for name in ("dcl", "acl"):
        # "(B)" (CV-Bench) and "B" (letters) are the same answer token for a model
        vocab = {t.name: {s.target.lower().strip("()") for s in t.train} for t in load_stream(str(root), name)}
        shared = [(a, b) for a in vocab for b in vocab if a < b and vocab[a] & vocab[b]]
        assert len(shared) >= 2, (name, vocab)
    dcl = {t.name: {s.target for s in t.train} for t in load_stream(str(root), "dcl")}
    assert {"yes", "no"} <= dcl["RS"] & dcl["Med"] & dcl["AD"] & dcl["Fin"]
    assert {"A", "B"} <= dcl["Sci"] & dcl["Fin"]


def test_med_and_fin_train_questions_carry_the_eval_instruction(synthetic_small):
    from mllmcl.data.prompts import eval_prompt

    stream = load_stream(str(synthetic_small), "dcl", tasks=["Med", "Fin"])
    for task in stream:
        # what a model sees at test time has the same form as what it was trained on
        assert all("\n" in s.question and ("Answer" in s.question or "answer" in s.question) for s in task.train)
        assert all(eval_prompt(s) != s.question for s in task.test)


def test_ensure_reuses_a_matching_folder(tmp_path):
    spec = SyntheticSpec(n_train=2, n_test=2, streams=("acl",))
    out = ensure_synthetic(tmp_path, spec, progress=False)
    marker = (out / "synthetic.json").stat().st_mtime_ns
    ensure_synthetic(tmp_path, spec, progress=False)
    assert (out / "synthetic.json").stat().st_mtime_ns == marker


def _ensure_in_another_process(out, spec, start):
    start.wait()
    ensure_synthetic(out, spec, progress=False)


def test_ensure_from_several_processes_at_once_leaves_one_whole_folder(tmp_path):
    """Jobs starting on one node together all ask for the default twin: one writes it, the others
    wait (without the lock, one's rmtree of a task folder pulls the files from under another)."""
    import multiprocessing

    spec = SyntheticSpec(n_train=40, n_test=10, image_size=32, streams=("acl",))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_ensure_in_another_process, args=(tmp_path / "twin", spec, start)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    reference = write_synthetic(tmp_path / "alone", spec, progress=False)
    assert _digest(tmp_path / "twin") == _digest(reference)
