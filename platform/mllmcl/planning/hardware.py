"""The cluster a plan is for: nodes × GPUs of one type (peak dense bf16 TFLOP/s, memory, memory
bandwidth), or this machine's CPUs (measured, see ``bench/plan_check.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl.errors import ConfigError


@dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # dense bf16 peak (fp32 for a CPU), TFLOP/s
    memory_gib: float
    bandwidth_gbs: float  # memory bandwidth, GB/s (decoding is bound by it)


GPUS = {d.name: d for d in (
    Device("A100-40GB", 312.0, 40.0, 1555.0),
    Device("A100-80GB", 312.0, 80.0, 2039.0),
    Device("H100-80GB", 989.0, 80.0, 3350.0),
    Device("H200", 989.0, 141.0, 4800.0),
    Device("L40S", 362.0, 48.0, 864.0),
    Device("A10G", 125.0, 24.0, 600.0),
)}


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    device: Device
    mfu: float = 0.35  # model FLOPs utilisation of training and prefill
    startup_s: float = 60.0  # per fit: worker group, imports, the base read from storage (plus its bytes below)
    storage_gbs: float = 2.0  # reading the base model's weights at a fit's start, GB/s per node
    cpus_per_node: int = 0  # CPUs Ray may place fits on (0: they do not limit a GPU cluster)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def resources(self) -> dict[str, float]:
        """What Ray would report of this cluster (``ray.cluster_resources()``)."""
        return {"CPU": float(self.nodes * self.cpus_per_node) if self.cpus_per_node else 1e9, "GPU": float(self.gpus)}

    @classmethod
    def parse(cls, nodes: int, gpus_per_node: int, gpu: str | None = None, tflops: float | None = None,
              memory_gib: float | None = None, bandwidth_gbs: float | None = None, mfu: float = 0.35,
              startup_s: float = 60.0) -> "ClusterSpec":
        problems = []
        if nodes < 1 or gpus_per_node < 1:
            problems.append(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
        if not 0 < mfu <= 1:
            problems.append(f"--mfu {mfu}: must be in (0, 1]")
        base = None
        if gpu:
            base = GPUS.get(gpu)
            if base is None:
                problems.append(f"--gpu {gpu!r}: expected one of {', '.join(GPUS)} (or give --tflops and --memory-gib)")
        elif tflops is None or memory_gib is None:
            problems.append("give --gpu, or --tflops and --memory-gib")
        if problems:
            raise ConfigError(problems)
        device = Device(gpu or "custom", tflops or base.tflops, memory_gib or base.memory_gib,
                        bandwidth_gbs or (base.bandwidth_gbs if base else 1500.0))
        return cls(nodes, gpus_per_node, device, mfu, startup_s)
