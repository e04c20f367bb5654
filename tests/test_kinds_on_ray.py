"""Every method's own adapter kind trains under Ray Train with DDP and with DeepSpeed.

A method with an adapter kind of its own (its layer, a pass over the data before training, an
objective, a regulariser, what it saves) runs that kind in the Ray Train workers. For each such
method, stage 1's fit of a two-task stream (RS -> Med: the kind continues from stage 0's
adapter, so a previous task's state is read) is trained three times from the same stage-0
artifacts: in this process (one worker, the reference), on two DDP workers and on two DeepSpeed
ZeRO-2 workers. All methods' fits of one strategy run in one Ray Train worker group (a worker
group per fit would cost ~20 s of start-up each on 2 cores), through the same per-worker
``train_adapter`` a stream's fit runs. Two workers with the same effective batch compute one
worker's update, so every stored tensor matches the reference (floats within 1e-4).

Whole streams of these methods run on the local backend in the contract test; lora_ft's,
moelora's and disco_select's Ray paths run whole streams in test_stream.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mllmcl import run_stream
from mllmcl.config import load_config
from mllmcl.methods import get_method, registered_methods

TWO = "data.tasks=[RS,Med]"
OWN_KINDS = {"olora", "moelora", "sefe", "keeplora", "clmoe", "phi_dpo", "hide", "disco"}


def _train_all(config: dict) -> None:
    """Ray Train's per-worker entry point here: the fits one after another in one worker group,
    each from its start (the group's latest checkpoint is the previous fit's: not resumed from)."""
    from mllmcl.training.worker import RayTrainSession, train_adapter

    class Fresh(RayTrainSession):
        def checkpoints(self):
            return []

    for fit in config["fits"]:
        train_adapter(fit, Fresh())


def _cfg(root, overrides, method):
    return load_config(None, [*overrides, "scaling.backend=local", f"storage.root={root}", f"method.name={method}",
                              TWO, "train.batch_size=4"])


@pytest.fixture(scope="module")
def stage1_fits(tmp_path_factory, stream_overrides):
    """method -> the FitConfigs of stage 1's fits that use the method's own adapter kind."""
    from mllmcl.data.source import load_configured_stream
    from mllmcl.methods.base import Stage
    from mllmcl.storage.layout import RunLayout
    from mllmcl.training.trainer import fit_config

    root = tmp_path_factory.mktemp("kinds")
    fits = {}
    for method in registered_methods():
        cfg = _cfg(root, stream_overrides, method)
        stream = load_configured_stream(cfg.data, progress=False)
        layout = RunLayout(cfg.storage.root, method)
        if not any(r.adapter_kind for r in get_method(method)(cfg, stream).plan(Stage(0, stream, layout, cfg))):
            continue  # a PEFT LoRA through LoraKind: lora_ft's path (test_stream.py)
        run_stream(cfg, method, stop_after=0)
        m = get_method(method)(cfg, stream)
        manifest = json.loads((Path(layout.run_dir) / "manifest.json").read_text())
        m.load_state_dict(manifest["stages"][0]["method_state"] or {})
        reqs = [r for r in m.plan(Stage(1, stream, layout, cfg)) if r.adapter_kind is not None]
        fits[method] = [fit_config(r, cfg.model.path, cfg.scaling) for r in reqs]
    return root, fits


def _moved(fit, folder: Path):
    return dataclasses.replace(fit, request=dataclasses.replace(fit.request, output_uri=str(folder)))


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def _compare(reference: Path, other: Path) -> list[str]:
    a, b = _tensors(reference), _tensors(other)
    if not a:
        return [f"{reference}: no tensors saved"]
    if a.keys() != b.keys():
        return [f"{other}: other tensors ({sorted(set(a) ^ set(b))[:3]})"]
    problems = []
    for k, t in a.items():
        u = b[k]
        if t.shape != u.shape:
            problems.append(f"{k}: shape {tuple(u.shape)} != {tuple(t.shape)}")
        elif t.is_floating_point():
            diff = float((t.float() - u.float()).abs().max()) if t.numel() else 0.0
            if diff >= 1e-4:
                problems.append(f"{k}: differs by {diff}")
        elif not bool((t == u).all()):
            problems.append(f"{k}: integer tensor differs")
    return problems


def test_every_methods_kind_trains_under_ddp_and_deepspeed(ray_session, stage1_fits):
    from ray import cloudpickle
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mllmcl.cluster import forwarded_env
    from mllmcl.training.trainer import run_local_training

    root, fits = stage1_fits
    assert set(fits) == OWN_KINDS, sorted(fits)  # test_stream.py's coverage list names the same
    for method, method_fits in fits.items():
        for i, fit in enumerate(method_fits):
            run_local_training(_moved(fit, root / "local" / method / str(i)), str(root / "ckpt-local" / method / str(i)))

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    for strategy in ("ddp", "deepspeed"):
        moved = [dataclasses.replace(_moved(fit, root / strategy / method / str(i)), strategy=strategy, zero_stage=2,
                                     threads=1, checkpoint_every=0)
                 for method, method_fits in fits.items() for i, fit in enumerate(method_fits)]
        TorchTrainer(_train_all, train_loop_config={"fits": moved}, torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"kinds-{strategy}", storage_path=str(root / "ray"),
                                          checkpoint_config=CheckpointConfig(num_to_keep=1),
                                          worker_runtime_env={"env_vars": forwarded_env()})).fit()
        problems = []
        for method, method_fits in fits.items():
            for i, _ in enumerate(method_fits):
                out = root / strategy / method / str(i)
                meta = json.loads((out / "meta.json").read_text())
                assert (meta["workers"], meta["strategy"]) == (2, strategy), (method, meta)
                problems += [f"{strategy} {method}: {p}" for p in _compare(root / "local" / method / str(i), out)]
        assert not problems, "\n".join(problems)
