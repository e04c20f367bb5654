"""The cluster files parse, carry the keys their tools require, and install exactly the
versions pinned in pyproject.toml (no Ray, no cloud: these are checks of the files)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", d)
        assert m, f"unpinned dependency in pyproject.toml: {d}"
        out[m.group(1).lower()] = m.group(3)
    return out


def _installed_pins(text: str) -> dict[str, str]:
    """Every ``name==version`` a pip command in ``text`` installs."""
    found = {}
    for line in text.splitlines():
        if "pip install" not in line:
            continue
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s\"'\\]*)", line):
            found[name.lower()] = version
    return found


def test_ray_cluster_launcher_file():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "idle_timeout_minutes"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 8]
    assert gpu_types, "no 8-GPU worker type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
        assert t["node_config"]["InstanceType"] and "IamInstanceProfile" in t["node_config"]  # S3 by role
    assert types[cfg["head_node_type"]].get("resources", {}).get("GPU", 0) == 0
    setup = "\n".join(cfg["setup_commands"])
    assert _installed_pins(setup) == {"torch": _pins()["torch"]}
    assert re.search(r"pip install .*-e \"\$HOME/mllmcl\[deepspeed\]\"", setup), \
        "setup must install the project (its pinned deps, DeepSpeed extra)"
    assert cfg["file_mounts"]["~/mllmcl"] == "."


def test_dockerfile_installs_the_pinned_versions():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    pins = _pins()
    base = re.search(r"^FROM\s+rayproject/ray:([0-9.]+)-", text, re.M)
    assert base and base.group(1) == pins["ray"], "the base image's Ray must be the pinned Ray"
    installed = _installed_pins(text)
    assert installed == {"torch": pins["torch"]}
    assert re.search(r"pip install [^\n]*\s\"\.\[deepspeed\]\"", text), "the image must install the project itself"
    for path in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for part in path.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"


def test_runtime_env():
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["MLLMCL_CACHE"]
    assert ".venv" in env["excludes"] and "artifacts" in env["excludes"]


def _image_and_ray(spec: dict) -> set[tuple[str, str]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return {(c["image"], spec["rayVersion"]) for g in groups for c in g["template"]["spec"]["containers"]}


def test_kuberay_rayjob():
    from mllmcl.config import load_config

    doc = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert {v for _, v in _image_and_ray(spec["rayClusterSpec"])} == {_pins()["ray"]}
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert any(int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 8
               for w in workers)
    words = spec["entrypoint"].split()
    assert words[:2] == ["python", "jobs/domain_stream.py"] and (ROOT / words[1]).exists()
    config = words[words.index("--config") + 1]
    overrides = [w for w in words[2:] if "=" in w]
    cfg = load_config(ROOT / config, overrides)  # the job's settings are a valid config
    assert cfg.method.name == "mr_lora" and cfg.storage.root.startswith("s3://")
    gpus = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker + cfg.scaling.eval_gpus
    assert gpus <= 8, "the stream must fit one 8-GPU node"
    yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.mark.parametrize("path", ["cluster/rayservice.yaml", "cluster/serve.yaml"])
def test_serve_applications(path):
    from mllmcl.serving.config import load_serve_config

    doc = yaml.safe_load((ROOT / path).read_text())
    if doc.get("kind") == "RayService":
        assert doc["apiVersion"] == "ray.io/v1"
        assert {v for _, v in _image_and_ray(doc["spec"]["rayClusterConfig"])} == {_pins()["ray"]}
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = doc["applications"][0]
    assert app["import_path"] == "mllmcl.serving.app:app_builder"
    assert app["args"]["run"].startswith("s3://") and "/runs/" in app["args"]["run"]
    load_serve_config(None, app["args"]["overrides"])  # every override is a valid ServeConfig key
    assert doc["http_options"]["port"] == 8000
