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
    assert cfg.model.path == "tiny" and cfg.storage.root == "artifacts"


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


def test_method_options_of_the_newer_baselines_are_checked():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=moelora", "method.moe_experts=3", "method.moe_gate=hash",
                           "method.olora_lambda1=-1", "method.prototype_samples_per_task=0",
                           "scaling.backend=local", "scaling.num_workers=2"])
    msg = str(e.value)
    for needle in ("lora.rank=16 must be a multiple of method.moe_experts=3", "method.moe_gate='hash'",
                   "method.olora_lambda1=-1", "method.prototype_samples_per_task=0",
                   "the local backend runs one worker"):
        assert needle in msg, needle
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
