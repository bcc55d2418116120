"""The hardware table: what the planner assumes about an accelerator it plans for but cannot see.

One data file, shipped with unitrain (`unitrain/hardware.json`): per accelerator its memory, peak dense bf16
FLOP/s, MFU prior, intra-node interconnect, the CPU memory a typical instance gives per GPU and an hourly price
with its source and date; plus the inter-node network. A user replaces or extends it with `--prices FILE`
(`resources.hardware`): an entry whose name is already known updates the fields it gives, a new name needs every
field. The advisor (`unitrain plan --advise`) prices the accelerators the file lists.

Names a user types are matched exactly: case, spaces, dashes and underscores do not matter, and each entry lists
its common spellings ("a100-80g", "H100 SXM"); anything else is an error with did-you-mean and the list. Device
strings that CUDA reports ("NVIDIA H100 80GB HBM3") go through a separate, fuzzy mapping (`from_device`).
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources as importlib_resources
from pathlib import Path

GiB = 1024**3
GB = 1e9
DEFAULT_ACCELERATOR = "H100"  # what `--gpus N` plans for on a machine without a GPU when no accelerator is named
PCIE_BW = 25e9  # bytes/s one way per GPU over PCIe 4.0 x16, what collectives get without NVLink


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s, no sparsity
    memory: int  # bytes per device
    mfu: float  # prior for achieved model FLOPs utilisation in training
    intra_node_bw: float = PCIE_BW  # bytes/s per GPU one way, collectives inside a node
    interconnect: str = "PCIe"
    host_memory: int = 0  # CPU bytes per GPU on a typical instance (0: unknown)
    host_memory_source: str = ""
    price: float | None = None  # USD per GPU-hour, on demand
    price_source: str = ""
    price_date: str = ""
    aliases: tuple = ()


# The CPU "accelerator" exists so every path is testable here; its numbers are a 2-core fp32 order of magnitude
# (replaced by calibration). It is not rented, so it is not in the data file.
CPU = Accelerator("CPU", 50e9, 0, 0.5, intra_node_bw=1e9, interconnect="gloo (host memory)")

_FIELDS = {  # data file key -> (Accelerator field, conversion)
    "peak_bf16_tflops": ("peak_flops", lambda v: float(v) * 1e12),
    "memory_gib": ("memory", lambda v: int(float(v) * GiB)),
    "mfu": ("mfu", float),
    "intra_node_bw_gbps": ("intra_node_bw", lambda v: float(v) * GB),
    "interconnect": ("interconnect", str),
    "host_memory_gib_per_gpu": ("host_memory", lambda v: int(float(v) * GiB)),
    "host_memory_source": ("host_memory_source", str),
    "price_per_gpu_hour": ("price", lambda v: None if v is None else float(v)),
    "price_source": ("price_source", lambda v: v or ""),
    "price_date": ("price_date", lambda v: v or ""),
    "aliases": ("aliases", lambda v: tuple(str(a) for a in v)),
}
_REQUIRED = ("peak_bf16_tflops", "memory_gib", "mfu", "intra_node_bw_gbps")


def _key(name: str) -> str:
    """Spelling-insensitive key: 'NVIDIA a100 80G' -> 'A10080G'."""
    k = re.sub(r"[\s_\-]+", "", str(name).upper())
    return re.sub(r"^(NVIDIA|GEFORCE|TESLA|AMD)+", "", k) or k


@dataclass(frozen=True)
class HardwareTable:
    accelerators: dict  # name -> Accelerator
    inter_node_bw: float  # bytes/s per node between nodes
    inter_node: str
    source: str  # where the table came from
    listed: tuple  # the accelerators the source file lists, in its order (what the advisor prices)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for a in self.accelerators.values():
            for n in (a.name, *a.aliases):
                self._index.setdefault(_key(n), a.name)

    def lookup(self, name: str) -> Accelerator:
        """A name a user typed -> the accelerator; exact up to spelling. ValueError names the close ones."""
        if _key(name) == "CPU":
            return CPU
        hit = self._index.get(_key(name))
        if hit is not None:
            return self.accelerators[hit]
        close = difflib.get_close_matches(_key(name), list(self._index), n=3, cutoff=0.6)
        close = list(dict.fromkeys(self._index[c] for c in close))
        mean = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"unknown accelerator {name!r}; {mean}known: {', '.join(self.accelerators)}, CPU "
                         f"(or set resources.peak_tflops to describe another, or add it with --prices FILE)")

    def from_device(self, device: str) -> Accelerator | None:
        """A CUDA device string ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-40GB') -> the accelerator, or None."""
        try:
            return self.lookup(device)
        except ValueError:
            pass
        key = _key(device)
        for part, target in [("H200", "H200"), ("H100PCIE", "H100-PCIE"), ("H100", "H100"), ("MI300X", "MI300X"),
                             ("A100", None), ("A10G", "A10G"), ("L40S", "L40S"), ("L4", "L4"), ("4090", "RTX4090"),
                             ("T4", "T4"), ("V100", "V100")]:
            if part in key:
                if target is None:  # A100: by the memory in the name
                    target = "A100-40GB" if "40G" in key else "A100-80GB"
                return self.accelerators.get(target)
        return None


def _parse_entry(raw: dict, base: Accelerator | None, where: str) -> Accelerator:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ValueError(f"{where}: each accelerator needs a 'name'")
    unknown = set(raw) - set(_FIELDS) - {"name"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: name, {', '.join(_FIELDS)}")
    if base is None:
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{where}: a new accelerator {raw['name']!r} needs {', '.join(missing)}")
        base = Accelerator(str(raw["name"]), 0.0, 0, 0.0)
    try:
        values = {attr: conv(raw[k]) for k, (attr, conv) in _FIELDS.items() if k in raw}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: accelerator {raw['name']!r}: {e}") from None
    return replace(base, **values)


def _read(path) -> dict:
    try:
        data = json.loads((path if hasattr(path, "read_text") else Path(path)).read_text())
    except FileNotFoundError:
        raise ValueError(f"hardware file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"hardware file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("accelerators"), list):
        raise ValueError(f"hardware file {path}: expected {{\"accelerators\": [{{\"name\": ..., ...}}, ...]}} "
                         f"(see unitrain/hardware.json)")
    return data


@functools.lru_cache(maxsize=None)
def _shipped() -> HardwareTable:
    src = importlib_resources.files("unitrain") / "hardware.json"
    data = _read(src)
    accs = {}
    for i, raw in enumerate(data["accelerators"]):
        a = _parse_entry(raw, None, f"unitrain/hardware.json accelerators[{i}]")
        accs[a.name] = a
    net = data.get("inter_node", {})
    return HardwareTable(accs, float(net.get("bw_gbps", 25)) * GB, net.get("interconnect", ""),
                         "unitrain/hardware.json", tuple(accs))


@functools.lru_cache(maxsize=16)
def _user(path: str) -> HardwareTable:
    base = _shipped()
    data = _read(path)
    accs, listed = dict(base.accelerators), []
    for i, raw in enumerate(data["accelerators"]):
        known = None
        if isinstance(raw, dict) and raw.get("name"):
            try:
                known = base.lookup(raw["name"])
            except ValueError:
                known = None
        a = _parse_entry(dict(raw, name=known.name) if known else raw, known, f"{path} accelerators[{i}]")
        accs[a.name] = a
        listed.append(a.name)
    net = data.get("inter_node", {})
    return HardwareTable(accs, float(net.get("bw_gbps", base.inter_node_bw / GB)) * GB,
                         net.get("interconnect", base.inter_node), str(path), tuple(listed))


def load_table(path: str | None = None) -> HardwareTable:
    """The shipped table, or the shipped table updated and extended by the user's file. ValueError on a bad file."""
    return _shipped() if not path else _user(str(Path(path).expanduser().resolve()))
