"""ResourceSpec: what the job may use. Units ("80GiB", "2e18", "3h", "5M tokens") and hardware detection."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
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


# The accelerator table lives in one data file (unitrain/hardware.json, loaded by unitrain/hardware.py).
from unitrain.hardware import CPU, DEFAULT_ACCELERATOR, Accelerator, load_table  # noqa: E402

ACCELERATORS = load_table().accelerators  # the shipped table, by name (CPU: hardware.CPU)

# The optional packages the project's pinned image has (docker/constraints.txt): the planner assumes the target
# has them unless told to look at this machine (resources.packages=local); `unitrain run` looks at its machine.
PINNED_PACKAGES = ("bitsandbytes", "deepspeed", "triton")
MEMORY_TOLERANCE = 0.03  # a device may report up to 3 % less than its datasheet (80 GB HBM3 -> 79.6 GiB)


def lookup_accelerator(name: str, table=None) -> Accelerator:
    """A name a user typed -> Accelerator, matched exactly up to spelling; ValueError with did-you-mean."""
    return (table or load_table()).lookup(name)


def installed_packages() -> list[str]:
    """Which of the pinned optional packages this machine has."""
    import importlib.util

    return [p for p in PINNED_PACKAGES if importlib.util.find_spec(p) is not None]


@dataclass
class ResourceSpec:
    """What one job may use. Memory in bytes; budget optional (then the recipe's steps/epochs rule).

    `on_cpu` is the one answer to "is this a CPU run?" (then gpus_per_node counts processes and gpu_memory is
    the memory one process may use); `packages` the one answer to "does the target have deepspeed /
    bitsandbytes / triton?". Everything downstream reads them from the plan's resources."""

    gpus_per_node: int
    nodes: int
    gpu_memory: int
    cpu_memory: int
    accelerator: str
    peak_flops: float
    mfu: float
    budget: Optional[Budget] = None
    on_cpu: Optional[bool] = None  # None: decided here, from the GPU count and the accelerator
    intra_node_bw: Optional[float] = None  # bytes/s per GPU inside a node; None: the hardware table's
    inter_node_bw: Optional[float] = None  # bytes/s per node between nodes; None: the hardware table's
    packages: Optional[list] = None  # optional packages the target has; None: the pinned image's
    assumed: list = field(default_factory=list)  # what was assumed, not given or found; each says how to change it

    def __post_init__(self):
        if self.on_cpu is None:
            self.on_cpu = self.gpus_per_node == 0 or self.accelerator == "CPU"
        if self.packages is None:
            self.packages = list(PINNED_PACKAGES)
        if self.intra_node_bw is None or self.inter_node_bw is None:
            table = load_table()
            known = table.accelerators.get(self.accelerator)
            if self.intra_node_bw is None:
                self.intra_node_bw = CPU.intra_node_bw if self.on_cpu else \
                    known.intra_node_bw if known else Accelerator("", 0, 0, 0).intra_node_bw
            if self.inter_node_bw is None:
                self.inter_node_bw = table.inter_node_bw

    @property
    def world_size(self) -> int:
        return max(1, self.gpus_per_node) * self.nodes

    def has(self, package: str) -> bool:
        return package in self.packages

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def detect() -> dict:
    """What this machine has: {'gpus', 'gpu_memory', 'accelerator', 'cpu_memory'} ('gpus' 0: no CUDA)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpus": torch.cuda.device_count(), "gpu_memory": int(props.total_memory),
                "accelerator": props.name, "cpu_memory": _cpu_memory()}
    return {"gpus": 0, "gpu_memory": _cpu_memory(), "accelerator": "CPU", "cpu_memory": _cpu_memory()}


def _gib(n: float) -> str:
    return f"{n / GiB:.0f} GiB" if n >= 10 * GiB else f"{n / GiB:.1f} GiB"


class _Machine:
    """This machine, detected once and only when a decision needs it (explicit resources never probe)."""

    def __init__(self, table):
        self.table, self._hw = table, None

    @property
    def hw(self) -> dict:
        self._hw = self._hw or detect()
        return self._hw

    @property
    def cuda(self) -> bool:
        return self.hw["gpus"] > 0

    def accelerator(self, peak_tflops) -> Accelerator:
        from unitrain.errors import UnitrainError

        found = self.table.from_device(self.hw["accelerator"])
        if found is not None:
            return found
        if peak_tflops is None:
            raise UnitrainError(f"this machine's GPU {self.hw['accelerator']!r} is not in the hardware table; set "
                                f"resources.accelerator to the closest of {', '.join(self.table.accelerators)}, or "
                                f"describe it with resources.peak_tflops (dense bf16 TFLOP/s), e.g. "
                                f"resources.peak_tflops=300")
        return Accelerator(self.hw["accelerator"], peak_tflops * 1e12, 0, 0.4)


def _named(cfg, table) -> Accelerator | None:
    """The accelerator the recipe names (None: auto)."""
    from unitrain.errors import UnitrainError

    if cfg.accelerator == "auto":
        return None
    try:
        return table.lookup(cfg.accelerator)
    except ValueError as e:
        if cfg.peak_tflops is None:
            raise UnitrainError(f"resources.accelerator: {e}") from None
        return Accelerator(cfg.accelerator, cfg.peak_tflops * 1e12, 0, 0.4)


def _plan_target(cfg, named, machine, assumed: list) -> tuple[Accelerator, int, bool]:
    """(accelerator, GPUs per node, is this machine) for planning: a GPU count means GPUs, whatever is here."""
    gpus = cfg.gpus_per_node
    if named is None and gpus == "auto":
        if not machine.cuda:  # no GPU asked for and none here: plan for this CPU
            return CPU, 0, True
        return machine.accelerator(cfg.peak_tflops), machine.hw["gpus"], True
    if named is None:  # N GPUs of an unnamed kind: this machine's, else the default
        if machine.cuda:
            acc = machine.accelerator(cfg.peak_tflops)
        else:
            acc = machine.table.lookup(DEFAULT_ACCELERATOR)
            assumed.append(f"accelerator {acc.name}, the default (none named, and this machine has no GPU); plan for "
                           f"another with --accelerator NAME (resources.accelerator; names in unitrain/hardware.json), "
                           f"or compare them all with --advise")
        return acc, int(gpus), machine.cuda
    here = None
    if gpus == "auto" or cfg.gpu_memory in (None, "auto") or cfg.cpu_memory in (None, "auto"):
        local = machine.table.from_device(machine.hw["accelerator"]) if machine.cuda else None
        here = local is not None and local.name == named.name
    if gpus == "auto":
        if here:
            return named, machine.hw["gpus"], True
        assumed.append(f"1 GPU per node: {named.name} was named without a GPU count; set --gpus N "
                       f"(resources.gpus_per_node)")
        return named, 1, False
    return named, int(gpus), bool(here)


def _run_target(cfg, named, machine, world: int) -> tuple[Accelerator, int, bool]:
    """(accelerator, GPUs per node, True) for `unitrain run`: what this machine has; asking for more is an error.
    `auto` GPUs are the processes the launcher started on this node (one without a launcher)."""
    from unitrain.errors import UnitrainError

    gpus = cfg.gpus_per_node
    asked = " × ".join(x for x in (str(gpus) if gpus != "auto" else "", named.name if named else "GPU") if x)
    if not machine.cuda:
        if gpus == "auto" and named is None:
            return CPU, 0, True
        raise UnitrainError(
            f"the recipe asks for {asked} (resources.gpus_per_node={gpus}, resources.accelerator={cfg.accelerator}) "
            f"but this machine has no CUDA GPU (torch.cuda.is_available() is False). Run it on a machine with "
            f"those GPUs, or train here on the CPU with resources.gpus_per_node=auto (or 0) and "
            f"resources.accelerator=auto; `unitrain plan` plans for GPUs you do not have")
    here = machine.accelerator(cfg.peak_tflops)
    n = machine.hw["gpus"]
    if named is not None and named.name != here.name:
        raise UnitrainError(
            f"the recipe asks for {named.name} GPUs (resources.accelerator={cfg.accelerator}) but this machine has "
            f"{n} × {machine.hw['accelerator']} ({here.name}); run it where the recipe's GPUs are, or plan for these "
            f"with resources.accelerator=auto")
    if gpus != "auto" and int(gpus) > n:
        raise UnitrainError(
            f"the recipe asks for {gpus} GPUs per node (resources.gpus_per_node={gpus}) but this machine has {n} "
            f"({machine.hw['accelerator']}); use resources.gpus_per_node={n} (or auto), or run on a node with {gpus}")
    if cfg.gpu_memory not in (None, "auto"):
        want, have = parse_memory(cfg.gpu_memory), machine.hw["gpu_memory"]
        if want > have * (1 + MEMORY_TOLERANCE):
            raise UnitrainError(
                f"the recipe asks for {_gib(want)} per GPU (resources.gpu_memory={cfg.gpu_memory}) but this "
                f"machine's {here.name} has {_gib(have)}; use resources.gpu_memory=auto to plan for what is here")
    return here, max(1, world // cfg.nodes) if gpus == "auto" else int(gpus), True


def resolve_resources(cfg, world_size: int | None = None, *, mode: str = "plan") -> ResourceSpec:
    """Turn the recipe's `resources` section into a ResourceSpec.

    mode "plan" plans for the target, from anywhere: `gpus_per_node: N > 0` means N GPUs of the named accelerator
    (else of this machine's GPU, else of DEFAULT_ACCELERATOR, said in `assumed`); CPU only when asked for
    (gpus_per_node=0 or accelerator=CPU) or when no GPU count is given on a machine without one. Memory left on
    auto is this machine's when it is the target, else the hardware table's; packages are the pinned image's
    unless resources.packages=local. mode "run" plans for this machine: what it has (a recipe asking for GPUs it
    lacks is an error naming both) and the packages installed here.

    `world_size` is what the launcher provides (torchrun/deepspeed); a conflict with the recipe is an
    error naming both numbers.
    """
    from unitrain.errors import UnitrainError

    try:
        table = load_table(getattr(cfg, "hardware", None))
    except ValueError as e:
        raise UnitrainError(f"resources.hardware: {e}") from None
    machine = _Machine(table)
    named = _named(cfg, table)
    assumed: list[str] = []
    if cfg.gpus_per_node == 0 or (named is not None and named.name == "CPU"):
        accel, gpus, here = CPU, int(cfg.gpus_per_node) if cfg.gpus_per_node != "auto" else 0, True
    elif mode == "run":
        accel, gpus, here = _run_target(cfg, named, machine, world_size or 1)
    else:
        accel, gpus, here = _plan_target(cfg, named, machine, assumed)
    on_cpu = accel.name == "CPU" or gpus == 0
    if cfg.gpu_memory not in (None, "auto"):
        gpu_mem = parse_memory(cfg.gpu_memory)
    elif on_cpu:
        gpu_mem = machine.hw["cpu_memory"]
    elif here:
        gpu_mem = machine.hw["gpu_memory"]
    elif accel.memory:
        gpu_mem = accel.memory
    else:
        raise UnitrainError(f"the memory of a {accel.name} is not in the hardware table: set resources.gpu_memory "
                            f"(--gpu-memory), e.g. resources.gpu_memory=48GiB")
    if cfg.cpu_memory not in (None, "auto"):
        cpu_mem = parse_memory(cfg.cpu_memory)
    elif on_cpu or here or not accel.host_memory:
        cpu_mem = machine.hw["cpu_memory"]
        if not (on_cpu or here):
            assumed.append(f"CPU memory {_gib(cpu_mem)} per node, this machine's (the hardware table has none for "
                           f"{accel.name}); set --cpu-memory (resources.cpu_memory)")
    else:
        cpu_mem = accel.host_memory * max(1, gpus)
        assumed.append(f"CPU memory {_gib(cpu_mem)} per node: {_gib(accel.host_memory)} per {accel.name} "
                       f"({accel.host_memory_source or 'the hardware table'}); set --cpu-memory (resources.cpu_memory)")
    if mode == "run" or getattr(cfg, "packages", "pinned") == "local":
        packages = installed_packages()
    else:
        packages = list(PINNED_PACKAGES)
        assumed.append(f"software: the pinned image's {', '.join(PINNED_PACKAGES)} (docker/constraints.txt); plan "
                       f"with this machine's packages with --local-packages (resources.packages=local)")
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else accel.peak_flops
    spec = ResourceSpec(gpus_per_node=gpus, nodes=cfg.nodes, gpu_memory=gpu_mem, cpu_memory=cpu_mem,
                        accelerator=accel.name, peak_flops=peak, mfu=accel.mfu,
                        budget=parse_budget(cfg.budget) if cfg.budget else None, on_cpu=on_cpu,
                        intra_node_bw=accel.intra_node_bw, inter_node_bw=table.inter_node_bw, packages=packages,
                        assumed=assumed)
    if spec.on_cpu and world_size and world_size > 1 and cfg.gpu_memory in (None, "auto"):
        spec.gpu_memory = cpu_mem // max(1, world_size // cfg.nodes)  # processes on a node share its memory
    if mode == "run":
        world_size = world_size or 1  # a run is the processes started: one without a launcher
    if world_size is not None and (world_size > 1 or mode == "run") and world_size != spec.world_size:
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
