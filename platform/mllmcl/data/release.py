"""Reader for the MLLM-CL release layout, from a local folder or an ``s3://`` prefix.

Layout (BENCHMARK.md)::

    <root>/Domain_data/<RS|Med|AD|Sci|Fin>/{images/, train.json, test.json}
    <root>/Ability_data/<OCR|Math|VP|APP>/{images/, train.json}
    <root>/Ability_data/<OCR|Math|VP|APP>_test/{images/, test.json}

``root`` may also point directly at ``Domain_data`` or ``Ability_data``.
Every problem of a file is collected and reported in one :class:`DataError`
naming the file, the record and the field, before anything trains.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Iterable, Sequence

import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from mllmcl import storage
from mllmcl.data.streams import StreamSpec, get_stream_spec
from mllmcl.data.types import Sample, Stream, Task
from mllmcl.errors import DataError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
MAX_LISTED_PROBLEMS = 20
VERIFY_MODES = ("none", "exists", "decode")


def _raise_problems(path: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = "\n".join(f"  - {p}" for p in shown)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataError(f"{path}: {len(problems)} problem(s):\n{lines}{tail}")


def strip_image_token(text: str) -> str:
    return text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()


def _read_json_list(path: str) -> list[Any]:
    if not storage.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _list_files(folder: str) -> set[str]:
    """Relative paths of every file under ``folder`` (one listing, also on S3)."""
    fs, base = storage.filesystem_for(folder)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return set()
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = base.rstrip("/") + "/"
    return {i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def _resolve_image(rel: str, files: set[str]) -> str | None:
    rel = rel.lstrip("./") if rel.startswith("./") else rel
    for cand in (rel, f"images/{rel}"):
        if cand in files:
            return cand
    return None


def parse_train_records(path: str, task: str, records: Sequence[Any]) -> tuple[list[dict], list[str]]:
    """Turn LLaVA conversation records into plain dicts; return (rows, problems)."""
    rows, problems = [], []
    for i, rec in enumerate(records):
        where = f"record {i}" + (f" (id={rec.get('id')!r})" if isinstance(rec, dict) and "id" in rec else "")
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected an object, got {type(rec).__name__}")
            continue
        missing = [k for k in ("id", "image", "conversations") if k not in rec]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}")
            continue
        conv = rec["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
            problems.append(f"{where}: 'conversations' must be a list of human/gpt turn pairs")
            continue
        bad_turn = False
        for k in range(0, len(conv), 2):
            h, g = conv[k], conv[k + 1]
            if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human" and g.get("from") == "gpt"
                    and isinstance(h.get("value"), str) and isinstance(g.get("value"), str)):
                problems.append(f"{where}: turn {k // 2} must be {{'from': 'human', 'value': str}} then "
                                f"{{'from': 'gpt', 'value': str}}")
                bad_turn = True
                break
        if bad_turn:
            continue
        n_turns = len(conv) // 2
        for k in range(n_turns):
            uid = str(rec["id"]) if n_turns == 1 else f"{rec['id']}#{k}"
            rows.append(dict(uid=uid, image_rel=str(rec["image"]),
                             question=strip_image_token(conv[2 * k]["value"]),
                             answer=conv[2 * k + 1]["value"].strip(), meta={}))
    return rows, problems


def parse_test_records(path: str, task: str, records: Sequence[Any]) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    for i, rec in enumerate(records):
        qid = rec.get("question_id") if isinstance(rec, dict) else None
        where = f"record {i}" + (f" (question_id={qid!r})" if qid is not None else "")
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected an object, got {type(rec).__name__}")
            continue
        missing = [k for k in ("question_id", "image", "text", "answer") if k not in rec]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}")
            continue
        ans = rec["answer"]
        if isinstance(ans, list):
            if not ans or not all(isinstance(a, (str, int, float)) for a in ans):
                problems.append(f"{where}: 'answer' list must hold one or more strings")
                continue
            answer: str | tuple[str, ...] = tuple(str(a) for a in ans)
        elif isinstance(ans, (str, int, float)) and not isinstance(ans, bool):
            answer = str(ans)
        else:
            problems.append(f"{where}: 'answer' must be a string or a list of strings, got {type(ans).__name__}")
            continue
        meta = {k: v for k, v in rec.items() if k not in ("question_id", "image", "text", "answer")}
        rows.append(dict(uid=str(qid), image_rel=str(rec["image"]), question=strip_image_token(str(rec["text"])),
                         answer=answer, meta=meta))
    return rows, problems


def _load_split(folder: str, filename: str, task: str, split: str, verify_images: str) -> list[Sample]:
    path = storage.join(folder, filename)
    records = _read_json_list(path)
    parse = parse_train_records if split == "train" else parse_test_records
    rows, problems = parse(path, task, records)
    files = _list_files(folder) if verify_images != "none" else None
    samples = []
    seen: set[str] = set()
    for row in rows:
        if row["uid"] in seen:
            problems.append(f"duplicate id {row['uid']!r}")
            continue
        seen.add(row["uid"])
        rel = row["image_rel"]
        if files is not None:
            found = _resolve_image(rel, files)
            if found is None:
                problems.append(f"id {row['uid']!r}: image {rel!r} not found under {folder}")
                continue
            rel_resolved = found
        else:
            rel_resolved = rel
        samples.append(Sample(uid=row["uid"], task=task, split=split, image=storage.join(folder, rel_resolved),
                              image_rel=rel, question=row["question"], answer=row["answer"], meta=row["meta"]))
    _raise_problems(path, problems)
    if not samples:
        raise DataError(f"{path}: no records")
    if verify_images == "decode":
        bad = []
        for s in samples:
            try:
                load_image(s.image)
            except DataError as e:
                bad.append(str(e))
        _raise_problems(path, bad)
    return samples


def _stream_folder(root: str, spec: StreamSpec) -> str:
    """Accept either the release root or the stream's own folder."""
    root = str(root).rstrip("/")
    if root.rsplit("/", 1)[-1] == spec.folder:
        return root
    return storage.join(root, spec.folder)


def load_task(root: str, stream: str | StreamSpec, task: str, index: int | None = None,
              verify_images: str = "exists", limit: int | None = None) -> Task:
    """Load one task's train and test splits."""
    spec = get_stream_spec(stream) if isinstance(stream, str) else stream
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images={verify_images!r}: expected one of {VERIFY_MODES}")
    tspec = spec.task(task)
    base = _stream_folder(root, spec)
    train_dir = storage.join(base, task)
    test_dir = storage.join(base, f"{task}_test") if spec.separate_test_folder else train_dir
    if not storage.exists(train_dir):
        raise DataError(f"{train_dir}: task folder for {spec.name}/{task} not found")
    if not storage.exists(test_dir):
        raise DataError(f"{test_dir}: test folder for {spec.name}/{task} not found")
    train = _load_split(train_dir, "train.json", task, "train", verify_images)
    test = _load_split(test_dir, "test.json", task, "test", verify_images)
    if limit:
        train, test = train[:limit], test[:limit]
    idx = spec.task_names.index(task) if index is None else index
    return Task(spec=tspec, index=idx, root=train_dir, train=tuple(train), test=tuple(test))


def load_test_folder(folder: str, task: str, verify_images: str = "exists", limit: int | None = None) -> list[Sample]:
    """The test split in one task folder of the release layout (``test.json`` + images), e.g.
    ``<root>/Domain_data/RS`` or ``<root>/Ability_data/OCR_test``."""
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images={verify_images!r}: expected one of {VERIFY_MODES}")
    folder = str(folder).rstrip("/")
    if not storage.exists(storage.join(folder, "test.json")):
        raise DataError(f"{folder}: no test.json (expected a task folder of the MLLM-CL release)")
    samples = _load_split(folder, "test.json", task, "test", verify_images)
    return samples[:limit] if limit else samples


def load_stream(root: str, stream: str = "dcl", tasks: Iterable[str] | None = None,
                verify_images: str = "exists", limit: int | None = None) -> Stream:
    """Load a stream's tasks in benchmark order (or the order of ``tasks``).

    Problems in every task are gathered and raised together.
    """
    spec = get_stream_spec(stream)
    names = list(tasks) if tasks is not None else spec.task_names
    unknown = [n for n in names if n not in spec.task_names]
    if unknown:
        raise DataError(f"unknown task(s) {unknown} for stream {spec.name!r}: expected names from {spec.task_names}")
    loaded, errors = [], []
    for i, name in enumerate(names):
        try:
            loaded.append(load_task(root, spec, name, index=i, verify_images=verify_images, limit=limit))
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataError("\n".join(errors))
    return Stream(name=spec.name, root=str(root), tasks=tuple(loaded))


def decode_image(data: bytes) -> Image.Image:
    """An encoded image as RGB (files and service requests go through the same conversion)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def load_image(uri: str) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file raises :class:`DataError` naming it."""
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{uri}: image cannot be read ({e.__class__.__name__}: {e})") from None
    try:
        return decode_image(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{uri}: corrupt or unsupported image ({e})") from None
