"""ResourceSpec: what the job may use. Units ("80GiB", "2e18", "3h", "5M tokens") and hardware detection."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Literal, Optional

GiB = 1024**3

_MEM_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
              "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(value: str | int | float) -> int:
    """'80GiB' -> bytes. Decimal (GB) and binary (GiB) units; a bare number is bytes, and must be >= 1 MiB (a bare
    80 is a forgotten unit, not 80 bytes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory must be > 0, got {value}; example: 80GiB")
        n, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _MEM_UNITS:
            raise ValueError(f"cannot read memory size {value!r}; examples: 80GiB, 24GB, 512MiB")
        n, unit = float(m.group(1)) * _MEM_UNITS[m.group(2).lower()], m.group(2)
        if n <= 0:
            raise ValueError(f"memory must be > 0, got {value!r}; example: 80GiB")
    if not unit and n < 2**20:
        raise ValueError(f"memory size {value!r} has no unit and would mean {n:g} bytes; did you mean "
                         f"'{str(value).strip()}GiB'? (give a unit: 80GiB, 24GB, 512MiB)")
    return int(n)


@dataclass(frozen=True)
class Budget:
    """A compute budget in one of three units. GPU-hours are wall-clock hours × GPUs."""

    kind: Literal["flops", "gpu_hours", "tokens"]
    value: float

    def __str__(self) -> str:
        if self.kind == "flops":
            return f"{self.value:.3g} FLOPs"
        if self.kind == "gpu_hours":
            return f"{self.value:.3g} GPU-hours"
        return f"{self.value:.4g} tokens"


_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_budget(value: str | int | float) -> Budget:
    """'2e18' or '2e18 flops' -> FLOPs; '3h', '90m', '2.5 gpu-hours' -> GPU-hours; '5M tokens' -> tokens."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        b = Budget("flops", float(value))
    else:
        s = str(value).strip().lower().replace("_", "")
        num = r"([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)"
        if m := re.fullmatch(num + r"\s*(h|hr|hrs|hours?|gpu-?h(?:ours?)?|gpuh)", s):
            b = Budget("gpu_hours", float(m.group(1)))
        elif m := re.fullmatch(num + r"\s*(m|min|mins|minutes?)", s):
            b = Budget("gpu_hours", float(m.group(1)) / 60)
        elif m := re.fullmatch(num + r"\s*([kmbgt]?)\s*(tok|toks|tokens?)", s):
            b = Budget("tokens", float(m.group(1)) * _SUFFIX[m.group(2)])
        elif m := re.fullmatch(num + r"\s*(flops?)?", s):
            b = Budget("flops", float(m.group(1)))
        else:
            raise ValueError(f"cannot read budget {value!r}; examples: 2e18 (FLOPs), 6h (GPU-hours), "
                             f"90m (GPU-minutes), 50M tokens")
    if not b.value > 0:
        raise ValueError(f"budget must be > 0, got {value!r}; examples: 2e18, 6h, 50M tokens")
    return b


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s, no sparsity
    memory: int  # bytes per device
    mfu: float  # prior for achieved model FLOPs utilisation in training


# Vendor datasheets, dense (non-sparse) bf16/fp16 tensor throughput. MFU priors: llm-foundry tables
# (A100 45-64%, H100 36-46% for full fine-tuning); older/consumer parts get a conservative 35-40%.
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in [
    Accelerator("V100", 125e12, 32 * GiB, 0.35),  # fp16 tensor cores (no bf16)
    Accelerator("T4", 65e12, 16 * GiB, 0.30),
    Accelerator("A10G", 70e12, 24 * GiB, 0.40),  # AWS A10G: 70 TFLOPs dense bf16 (A10: 125)
    Accelerator("L4", 121e12, 24 * GiB, 0.38),
    Accelerator("RTX4090", 165e12, 24 * GiB, 0.40),  # fp16 w/ fp32 accumulate dense (GeForce spec)
    Accelerator("A100-40GB", 312e12, 40 * GiB, 0.50),
    Accelerator("A100-80GB", 312e12, 80 * GiB, 0.50),
    Accelerator("H100", 989e12, 80 * GiB, 0.40),  # SXM
    Accelerator("H100-PCIE", 756e12, 80 * GiB, 0.40),
    Accelerator("H200", 989e12, 141 * GiB, 0.42),
    Accelerator("MI300X", 1307e12, 192 * GiB, 0.35),
    # The CPU "accelerator" exists so every path is testable here; numbers are a 2-core fp32 order of
    # magnitude and are replaced by calibration.
    Accelerator("CPU", 50e9, 0, 0.5),
]}

_ALIASES = {"A100": "A100-80GB", "A100-80G": "A100-80GB", "A100-40G": "A100-40GB", "H100-SXM": "H100",
            "H100-80GB": "H100", "RTX-4090": "RTX4090", "4090": "RTX4090", "A10": "A10G"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().upper())


def lookup_accelerator(name: str) -> Accelerator:
    key = _norm(name)
    key = _ALIASES.get(key, key)
    if key in ACCELERATORS:
        return ACCELERATORS[key]
    # Device strings such as "NVIDIA H100 80GB HBM3" or "NVIDIA A100-SXM4-40GB".
    for alias, target in [("H200", "H200"), ("H100 PCIE", "H100-PCIE"), ("H100", "H100"), ("MI300X", "MI300X"),
                          ("A100", None), ("A10G", "A10G"), ("L4", "L4"), ("4090", "RTX4090"), ("T4", "T4"),
                          ("V100", "V100")]:
        if alias.replace(" ", "-") in key:
            if target is None:  # A100: pick by memory in the name
                target = "A100-40GB" if "40G" in key else "A100-80GB"
            return ACCELERATORS[target]
    raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)} "
                     f"(or set resources.peak_tflops to describe another)")


@dataclass
class ResourceSpec:
    """What one job may use. Memory in bytes; budget optional (then the recipe's steps/epochs rule).

    `on_cpu` is the one answer to "is this a CPU run?" (then gpus_per_node counts processes and gpu_memory is
    the memory one process may use); everything downstream reads it from the plan's resources."""

    gpus_per_node: int
    nodes: int
    gpu_memory: int
    cpu_memory: int
    accelerator: str
    peak_flops: float
    mfu: float
    budget: Optional[Budget] = None
    on_cpu: Optional[bool] = None  # None: decided here, from the GPU count and the accelerator

    def __post_init__(self):
        if self.on_cpu is None:
            self.on_cpu = self.gpus_per_node == 0 or self.accelerator == "CPU"

    @property
    def world_size(self) -> int:
        return max(1, self.gpus_per_node) * self.nodes

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def detect() -> dict:
    """What this machine has: {'gpus', 'gpu_memory', 'accelerator', 'cpu_memory'}."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpus": torch.cuda.device_count(), "gpu_memory": int(props.total_memory),
                "accelerator": props.name, "cpu_memory": _cpu_memory()}
    return {"gpus": 0, "gpu_memory": _cpu_memory(), "accelerator": "CPU", "cpu_memory": _cpu_memory()}


def resolve_resources(cfg, world_size: int | None = None) -> ResourceSpec:
    """Turn the recipe's `resources` section into a ResourceSpec, filling `auto` from this machine.

    `world_size` is what the launcher provides (torchrun/deepspeed); a conflict with the recipe is an
    error naming both numbers.
    """
    from unitrain.errors import UnitrainError

    hw = None

    def hardware():
        nonlocal hw
        hw = hw or detect()
        return hw

    gpus = hardware()["gpus"] if cfg.gpus_per_node == "auto" else int(cfg.gpus_per_node)
    if cfg.accelerator == "auto":
        accel_name = hardware()["accelerator"]
    else:
        accel_name = cfg.accelerator
    try:
        accel = lookup_accelerator(accel_name)
    except ValueError:
        if cfg.peak_tflops is None:
            raise UnitrainError(f"resources.accelerator: unknown accelerator {accel_name!r}; set "
                                f"resources.peak_tflops (dense bf16 TFLOP/s), e.g. resources.peak_tflops=300")
        accel = Accelerator(accel_name, cfg.peak_tflops * 1e12, 0, 0.4)
    gpu_mem = hardware()["gpu_memory"] if cfg.gpu_memory in (None, "auto") else parse_memory(cfg.gpu_memory)
    if cfg.gpu_memory in (None, "auto") and gpus > 0 and cfg.gpus_per_node != "auto" and accel.memory:
        gpu_mem = accel.memory if not hardware()["gpus"] else gpu_mem
    cpu_mem = hardware()["cpu_memory"] if cfg.cpu_memory in (None, "auto") else parse_memory(cfg.cpu_memory)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else accel.peak_flops
    spec = ResourceSpec(gpus_per_node=gpus, nodes=cfg.nodes, gpu_memory=gpu_mem, cpu_memory=cpu_mem,
                        accelerator=accel.name, peak_flops=peak, mfu=accel.mfu,
                        budget=parse_budget(cfg.budget) if cfg.budget else None)
    if spec.on_cpu and world_size and world_size > 1 and cfg.gpu_memory in (None, "auto"):
        spec.gpu_memory = cpu_mem // max(1, world_size // cfg.nodes)  # processes on a node share its memory
    if world_size is not None and world_size > 1 and world_size != spec.world_size:
        if cfg.gpus_per_node == "auto" and cfg.nodes == 1:
            spec.gpus_per_node, spec.nodes = world_size, 1  # one launcher node: trust the launcher
        elif spec.on_cpu and cfg.gpus_per_node == "auto":
            spec.gpus_per_node = world_size // cfg.nodes
        else:
            raise UnitrainError(
                f"the launcher started {world_size} processes but the recipe's resources say "
                f"{cfg.gpus_per_node} GPUs per node × {cfg.nodes} nodes = {spec.world_size}; make them agree "
                f"(e.g. resources.gpus_per_node={world_size // cfg.nodes}) or launch {spec.world_size} processes")
    return spec
