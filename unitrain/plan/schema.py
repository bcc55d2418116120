"""The Plan: everything the planner decided, with the numbers that explain it.

The trainer executes a Plan and never re-decides (DESIGN.md, principle 1). It is stored as
`plan.json` in the run directory and reloaded on resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union


@dataclass
class DataStats:
    """What the planner needs to know about the (tokenized) training data."""

    n_examples: int
    total_tokens: int  # real (non-pad) tokens over all training examples
    n_sequences: int  # sequences of length seq_len after packing (or examples when not packed)
    seq_len: int
    supervised_tokens: int = 0  # tokens that carry loss
    eval_tokens: int = 0  # real tokens one evaluation forwards (the eval split; padding inside batches aside)


@dataclass
class MemoryComponent:
    """One line of the per-GPU memory breakdown."""

    name: str  # weights, gradients, optimizer, activations, logits, comm_buffers, overhead, ...
    bytes: int
    formula: str  # human-readable formula, e.g. "2 B × Ψ (bf16)"
    inputs: dict = field(default_factory=dict)  # the numbers that went into the formula
    device: str = "gpu"  # "gpu" or "cpu" (offloaded)


@dataclass
class Strategy:
    """The memory strategy and batch shape."""

    method: str = "lora"  # full | lora | qlora
    zero_stage: int = 0  # 0 = plain torch (DDP when world_size > 1); 1-3 = DeepSpeed ZeRO
    offload_optimizer: bool = False
    offload_params: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    checkpointing: Union[str, int] = "off"  # off | full | k (every k-th layer)
    micro_batch_size: int = 1
    grad_accum: int = 1
    kernels: list = field(default_factory=list)  # active fused kernels, e.g. ["rmsnorm", "fused_ce"]
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage > 0


@dataclass
class Plan:
    strategy: Strategy
    world_size: int
    seq_len: int
    global_batch_size: int
    max_steps: int
    warmup_steps: int
    cooldown_steps: int
    tokens_per_step: int  # global_batch_size × seq_len (upper bound; packing makes it exact)
    flops_per_token: float
    flops_per_step: float
    step_time_s: float  # predicted seconds per optimizer step
    memory: list[MemoryComponent] = field(default_factory=list)  # per GPU
    peak_memory: int = 0  # predicted peak bytes per GPU
    usable_memory: int = 0  # memory per GPU minus the safety margin
    cpu_memory_needed: int = 0  # offloaded states + pinned buffers per node
    resources: dict = field(default_factory=dict)
    budget: Optional[dict] = None  # {"kind": ..., "value": ...}
    total_flops: float = 0.0
    total_tokens: int = 0
    epochs: float = 0.0
    data: dict = field(default_factory=dict)  # subset decision: examples, tokens, policy, reason
    rejected: list[dict] = field(default_factory=list)  # best rejected alternatives with the reason
    notes: list[str] = field(default_factory=list)
    calibration: Optional[dict] = None  # correction factors applied, if any
    calibration_key: str = ""  # hardware + model fingerprint under which measurements are stored
    predicted_allocated: int = 0  # peak minus context/fragmentation: compare with torch.cuda.max_memory_allocated
    peak_phase: str = ""  # where in the step the peak is (memory.PHASES), e.g. "head backward"
    model: dict = field(default_factory=dict)  # shape summary: name, params, trainable params, layers, ...

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["strategy"] = Strategy(**d["strategy"])
        d["memory"] = [MemoryComponent(**m) for m in d.get("memory", [])]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))
