"""Typed configs: presets, dotted overrides, every problem listed at once."""

from pathlib import Path

import pytest

from mllmcl.config import Config, load_config
from mllmcl.errors import ConfigError

PRESETS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").rglob("*.yaml"))


def test_there_are_presets():
    assert len(PRESETS) >= 4


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.data.stream == preset.parent.name  # presets live under their stream's folder
    header = preset.read_text().splitlines()[:4]
    assert any("python jobs/" in line for line in header), "preset header must show the command"


def test_defaults_and_dotted_overrides():
    cfg = load_config(None, ["train.lr=1e-4", "lora.rank=8", "data.tasks=[RS, Med]", "run.id=demo",
                             "lora.target_modules=q_proj,v_proj", "run.progress=false"])
    assert cfg.train.lr == 1e-4 and cfg.lora.rank == 8
    assert cfg.data.tasks == ("RS", "Med")
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.run.id == "demo" and cfg.run.progress is False
    assert cfg.model.path == "tiny" and cfg.data.root == "synthetic"
    assert cfg.storage.root == str(Path.cwd() / "artifacts")  # the default, anchored where the caller runs


def test_local_paths_are_made_absolute_where_the_config_is_read(tmp_path, monkeypatch):
    """Ray workers, actors, replicas and trials run in folders of their own: every local path of
    a config (plain, ~ or file://) is absolute once read; URIs and the built-in names are kept."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["storage.root=out/runs", "data.root=file://data/release", "model.path=~/models/llava"])
    assert cfg.storage.root == str(tmp_path / "out" / "runs")
    assert cfg.data.root == str(tmp_path / "data" / "release")
    assert cfg.model.path == str(tmp_path / "home" / "models" / "llava")
    kept = load_config(None, ["storage.root=s3://bucket/mllmcl", "data.root=synthetic", "model.path=tiny"])
    assert (kept.storage.root, kept.data.root, kept.model.path) == ("s3://bucket/mllmcl", "synthetic", "tiny")
    assert load_config(None, ["storage.root=file:///srv/runs"]).storage.root == "/srv/runs"
    raw = load_config(None, ["storage.root=out"], resolve=False)
    assert raw.storage.root == "out"


def test_relative_outputs_are_refused_inside_a_ray_job_copy(tmp_path, monkeypatch):
    """Under `ray job submit --working-dir`, the job runs in Ray's temporary copy of the folder:
    a relative storage root would be deleted with the session, so the job refuses it before any
    work, naming what to pass; absolute paths and s3:// are fine."""
    from argparse import Namespace

    from mllmcl.cli import resolve
    from mllmcl.paths import output_location_problems, ray_job_copy

    copy = tmp_path / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "jobs").mkdir(parents=True)
    monkeypatch.chdir(copy / "jobs")
    assert ray_job_copy() == str(copy)
    with pytest.raises(ConfigError) as e:
        resolve(Namespace(config=None, overrides=["method.name=zero_shot"]), "dcl")
    assert "storage.root='artifacts' is a relative path" in str(e.value) and "s3://" in str(e.value)
    ok = resolve(Namespace(config=None, overrides=[f"storage.root={tmp_path / 'keep'}"]), "dcl")
    assert ok.storage.root == str(tmp_path / "keep")
    assert output_location_problems({"--out": "s3://bucket/x", "storage": "/abs"}) == []
    monkeypatch.chdir(tmp_path)
    assert ray_job_copy() is None and output_location_problems({"--out": "rel"}) == []


def test_override_beats_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n  epochs: 2\n")
    cfg = load_config(p, ["train.epochs=3"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3.0


def test_every_problem_is_reported_at_once(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n  batch_size: 0\n  bogus: 1\nlora:\n  rank: 2.5\nmodel:\n  dtype: int4\n"
                 "nonsense: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["data.stream=ccl", "method.name=magic"])
    msg = str(e.value)
    for needle in ("train.lr: expected a number, got str 'fast'", "train.batch_size=0", "train.bogus: unknown key",
                   "lora.rank: expected an integer", "model.dtype='int4'", "nonsense: unknown key",
                   "data.stream='ccl'", "method.name='magic'"):
        assert needle in msg, needle
    assert len(e.value.problems) == 8


def test_unknown_task_in_config():
    with pytest.raises(ConfigError, match=r"data.tasks: unknown task\(s\) \['Geo'\]"):
        load_config(None, ["data.tasks=RS,Geo"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_config_error_pickles():
    import pickle

    err = ConfigError(["a", "b"])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == ["a", "b"] and str(back) == str(err)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "data.tasks=[OCR]", "data.stream=acl"])
    p = tmp_path / "out.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_method_options_of_the_newer_baselines_are_checked(caplog):
    # every option is checked by its own method, also when another method is named
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=moelora", "method.moe_experts=3", "method.moe_gate=hash",
                           "method.olora_lambda1=-1", "method.prototype_samples_per_task=0",
                           "method.moe_topk=2", "scaling.backend=local", "scaling.num_workers=2"])
    msg = str(e.value)
    for needle in ("lora.rank=16 must be a multiple of method.moe_experts=3", "method.moe_gate='hash'",
                   "method.olora_lambda1=-1", "method.prototype_samples_per_task=0",
                   "method.moe_topk: unknown option of method 'moelora' (its options: moe_experts, moe_gate, "
                   "moe_top_k)", "the local backend runs one worker"):
        assert needle in msg, needle
    # an option of another method (a budget shared over a sweep of methods) is ignored, with a warning
    with caplog.at_level("WARNING", logger="mllmcl.config"):
        cfg = load_config(None, ["method.name=lora_ft", "method.router_epochs=3", "method.replay_per_task=5"])
    assert cfg.method.name == "lora_ft" and not hasattr(cfg.method, "router_epochs")
    assert ("lora_ft ignores method.replay_per_task (an option of replay), method.router_epochs (an option of "
            "mr_lora)") in caplog.text
    with pytest.raises(ConfigError, match="moe_top_k=5"):
        load_config(None, ["method.moe_gate=topk", "method.moe_top_k=5"])
    with pytest.raises(ConfigError, match="scaling.backend='spark'"):
        load_config(None, ["scaling.backend=spark"])


def test_epochs_per_task():
    cfg = load_config(None, ["train.epochs_per_task=[1, 3, 1, 2, 1]", "train.epochs=8"])
    assert [cfg.train.settings(0, k).epochs for k in range(5)] == [1, 3, 1, 2, 1]
    assert cfg.train.settings(0).epochs == 8  # no stage: the general value
    with pytest.raises(ConfigError, match="2 values for 3 tasks"):
        load_config(None, ["train.epochs_per_task=[1, 3]", "data.tasks=[RS,Med,AD]"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(None, ["train.epochs_per_task=[1, 0, 1, 1, 1]"])


def test_task_orders_and_their_problems():
    from mllmcl.data.streams import ordered

    dcl = ["RS", "Med", "AD", "Sci", "Fin"]
    assert ordered(dcl, "paper") == dcl and ordered(dcl, "reverse") == dcl[::-1]
    shuffled = ordered(dcl, "random:1")
    assert sorted(shuffled) == sorted(dcl) and shuffled != dcl and shuffled == ordered(dcl, "random:1")
    assert ordered(dcl, "random:2") != shuffled
    assert load_config(None, ["data.order=[Med,RS,AD,Sci,Fin]"]).data.task_names() == ["Med", "RS", "AD", "Sci", "Fin"]
    assert load_config(None, ["data.tasks=[RS,Med,AD]", "data.order=reverse"]).data.task_names() == ["AD", "Med", "RS"]
    assert load_config(None, ["data.order=random:1"]).data.task_names() == shuffled
    # a list quoted as a string (a sweep file's grid value may be one)
    assert load_config(None, ['data.order="[Med, RS, AD, Sci, Fin]"']).data.task_names() == ["Med", "RS", "AD", "Sci", "Fin"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.order=sideways"])
    assert "data.order='sideways'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.tasks=[RS,Med]", "data.order=[Med,AD]"])
    assert "['AD'] not among the stream's tasks" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.order=[RS,RS,Med,AD,Sci]"])
    assert "named more than once" in str(e.value) and "missing" in str(e.value)
    with pytest.raises(ConfigError, match="integer seed"):
        load_config(None, ["data.order=random:x"])
