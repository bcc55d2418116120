"""The Plan: the compiled form of every decision, with the numbers that explain it.

The planner (`unitrain.plan.make_plan`) is the only writer; every other module reads the part it needs
(DESIGN.md, principle 1). Stored as `plan.json` in the run directory; `Plan.load(Plan.save(p)) == p`
exactly, and a relaunch executes the stored plan.

| part        | holds                                                        | read by                         |
| ----------- | ------------------------------------------------------------ | ------------------------------- |
| resources   | the resolved ResourceSpec (`on_cpu`, accelerator, world,     | everyone asking "CPU or GPU?"   |
|             | the packages the target has, what was assumed)               | or "is deepspeed there?"        |
| execution   | method, precision, optimizer, checkpointing, kernels, batch  | model build, backends           |
|             | shape, and the exact DeepSpeed engine config                 |                                 |
| length      | steps, warmup, cooldown, schedule, slots/tokens per step     | trainer, schedule               |
| compute     | FLOPs per slot (training and forward), step time             | governor, reports               |
| memory      | per-component bytes and the peak                             | reports, memory check           |
| data        | DataPlan: unique and training tokens, epochs, the subset     | selector (it fills, it does not |
|             | size and policy, what scoring may cost                       | size)                           |
| evals       | EvalPlan: eval set size, cadence, the cost of one eval       | trainer, governor               |
| budget      | the typed budget and its split (training / evals / ...)      | governor, reports               |
| prediction  | predicted held-out loss at the end, its interval and source  | reports, governor, summary      |

Two quantities are never mixed: *slots* are padded positions the model forwards (FLOPs are charged on them,
for training and evals alike); *tokens* are real, non-pad tokens (data size, epochs and throughput).
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional, Union

from unitrain.errors import UnitrainError
from unitrain.resources import Budget, ResourceSpec

SCHEMA_VERSION = 2


@dataclass
class DataStats:
    """What the planner knows about the training data (from a scan: tokenized, cleaned, packed). Not stored."""

    n_examples: int  # examples in the pool the plan draws from (after cleaning when `cleaned`)
    total_tokens: int  # real tokens over those examples
    n_sequences: int  # sequences of seq_len after packing all of them (or examples when not packed)
    seq_len: int
    supervised_tokens: int = 0  # tokens that carry loss
    eval_tokens: int = 0  # real tokens of the eval split
    train_lengths: list = field(default_factory=list, repr=False)  # real tokens per packed training sequence
    eval_lengths: list = field(default_factory=list, repr=False)  # ... per packed eval sequence
    cleaned: bool = False  # counts are after the cleaning scan (filters, exact and near duplicates)
    raw_examples: int = 0  # before cleaning
    raw_tokens: int = 0
    dropped: dict = field(default_factory=dict)  # cleaning: reason -> examples
    fingerprint: str = ""  # the clean pool and the eval split: learning curves are stored per data

    @property
    def slot_fill(self) -> float:
        """Real tokens per slot of a full-width sequence."""
        return self.total_tokens / max(1, self.n_sequences * self.seq_len)


@dataclass
class MemoryComponent:
    """One line of the per-GPU memory breakdown."""

    name: str  # weights, gradients, optimizer, activations, logits_loss, comm_buffers, overhead, ...
    bytes: int
    formula: str  # human-readable formula, e.g. "2 B × Ψ (bf16)"
    inputs: dict = field(default_factory=dict)  # the numbers that went into the formula (+ "phase")
    device: str = "gpu"  # "gpu" or "cpu" (offloaded)


@dataclass
class Execution:
    """How the step runs: the memory strategy, precision and batch shape (the search's candidate, compiled)."""

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
    precision: str = ""  # the precision regime the memory model assumed (memory.precision_for)
    world_size: int = 1
    global_batch_size: int = 1  # micro_batch_size × grad_accum × world_size sequences per optimizer step
    seq_len: int = 512
    deepspeed: Optional[dict] = None  # ZeRO plans: the exact config passed to deepspeed.initialize

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage > 0


@dataclass
class Length:
    steps: int
    warmup: int
    cooldown: int
    schedule: str  # wsd | cosine | constant
    rule: str  # how `steps` was set: max_steps | budget | epochs | epoch_cap | unset
    slots_per_step: float  # padded positions one optimizer step forwards (batches trimmed to their longest)
    tokens_per_step: float  # real tokens one optimizer step trains on


@dataclass
class Compute:
    flops_per_slot: float  # training FLOPs per forwarded position, recomputation included
    forward_flops_per_slot: float  # one forward (evals, scoring): no backward, no recomputation
    flops_per_step: float  # flops_per_slot × slots_per_step
    step_time_s: float  # predicted seconds per optimizer step
    compute_s: float = 0.0
    communication_s: float = 0.0
    offload_s: float = 0.0
    mfu: float = 0.0


@dataclass
class MemoryPlan:
    components: list[MemoryComponent] = field(default_factory=list)  # per GPU (or per process on CPU)
    peak: int = 0  # predicted peak bytes per GPU, context and fragmentation included
    allocated_peak: int = 0  # peak minus context/fragmentation: compare with torch.cuda.max_memory_allocated
    usable: int = 0  # memory per GPU minus the safety margin
    cpu_needed: int = 0  # offloaded states + pinned buffers + process memory per node
    peak_phase: str = ""  # where in the step the peak is (memory.PHASES), e.g. "head backward"

    def component(self, name: str) -> MemoryComponent | None:
        return next((c for c in self.components if c.name == name), None)


@dataclass
class DataPlan:
    """The data decision. Tokens are real (non-pad) tokens throughout."""

    scanned: bool = False  # data statistics were available (`unitrain plan` without --scan-data: no)
    cleaned: bool = False  # unique_* are after the cleaning scan; else the raw counts
    unique_examples: int = 0
    unique_tokens: int = 0
    slot_fill: float = 1.0  # real tokens per slot of a full-width packed sequence
    train_tokens: int = 0  # real tokens the planned steps train on
    subset_tokens: int = 0  # real tokens the selector fills (one pass over the subset)
    epochs: float = 0.0  # train_tokens / subset_tokens
    max_epochs: float = 4.0
    policy: str = "all"  # all (every clean example) | select (the selector ranks the pool and fills subset_tokens)
    embed: bool = False  # the selector buys sentence embeddings (diversity, semantic duplicates, difficulty)
    selection_flops: float = 0.0  # what the planned selection is expected to cost (embeddings)
    scoring_max_flops: Optional[float] = None  # what selection signals may cost (None: no FLOP budget to charge)
    reason: str = ""


@dataclass
class EvalPlan:
    sequences: int = 0  # packed eval sequences one eval forwards (the first ones of the eval split)
    tokens: int = 0  # real tokens among them
    slots: int = 0  # positions one eval forwards: batches trimmed to their longest + rank padding forwards
    batch_size: int = 1  # sequences per eval forward (the training micro-batch)
    every: int = 0  # cadence in optimizer steps (0 = only the final eval)
    count: int = 0  # evals the plan pays for: step 0 (when `initial`), every `every`, the end
    flops: float = 0.0  # one eval: slots × compute.forward_flops_per_slot
    initial: bool = True  # an eval at step 0 (the starting loss)
    stop_rule: bool = True  # enough evals, each big enough, for the governor's learning-curve stop rule
    reason: str = ""


@dataclass
class BudgetPlan:
    kind: Optional[str] = None  # flops | gpu_hours | tokens; None = no budget
    value: Optional[float] = None
    split: dict = field(default_factory=dict)  # training / evals / selection / calibration, in budget units
    unspent: float = 0.0  # deliberately left unspent, in budget units
    unspent_reason: str = ""

    @property
    def typed(self) -> Budget | None:
        return Budget(self.kind, self.value) if self.kind else None


@dataclass
class Prediction:
    """Predicted held-out loss (the run's eval split) at the end of the plan, from the quality model."""

    loss: Optional[float] = None  # None: no measured curve for this model and data yet (the level is unknown)
    low: Optional[float] = None  # central interval of the achieved final eval loss ...
    high: Optional[float] = None
    coverage: float = 0.8  # ... with this probability
    effective_tokens: float = 0.0  # D_eff the prediction is for (quality.effective_tokens)
    cooldown_factor: float = 1.0  # final (cooled-down) eval over the constant-LR curve, as measured (1: unknown)
    source: str = ""  # "prior" | the run whose measured curve it comes from
    key: str = ""  # model × method × lr × data fingerprint: where this run stores its measured curve
    detail: str = ""


@dataclass
class CalibrationUse:
    key: str = ""  # hardware × model × method × precision: where this run's measurements are stored
    factors: dict = field(default_factory=dict)  # measured / predicted factors applied to this plan
    source: str = ""  # the run that measured them
    time: float = 0.0
    model: dict = field(default_factory=dict)  # the model's own prediction per category, before any factor
    traced: dict = field(default_factory=dict)  # {key, factors, source, time}: `plan --trace`'s factors applied


@dataclass
class ModelSummary:
    name: str = ""
    model_type: str = ""
    params: int = 0
    trainable_params: int = 0
    layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    source: str = ""  # where the config came from


@dataclass
class Plan:
    model: ModelSummary
    resources: ResourceSpec
    execution: Execution
    length: Length
    compute: Compute
    memory: MemoryPlan
    data: DataPlan
    evals: EvalPlan
    budget: BudgetPlan
    prediction: Prediction = field(default_factory=Prediction)
    calibration: CalibrationUse = field(default_factory=CalibrationUse)
    rejected: list = field(default_factory=list)  # best rejected alternatives with the reason
    notes: list = field(default_factory=list)
    version: int = SCHEMA_VERSION

    # shorthands for the batch shape, read everywhere
    @property
    def world_size(self) -> int:
        return self.execution.world_size

    @property
    def global_batch_size(self) -> int:
        return self.execution.global_batch_size

    @property
    def seq_len(self) -> int:
        return self.execution.seq_len

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("version") != SCHEMA_VERSION:
            got = d.get("version", 1) if isinstance(d, dict) else type(d).__name__
            raise UnitrainError(f"plan.json has schema version {got}; this unitrain reads version {SCHEMA_VERSION}. "
                                f"Make a new plan (unitrain plan ... --out plan.json, or run with --replan)")
        return _decode(cls, d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnitrainError(f"plan file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnitrainError(f"plan file {path} is not valid JSON ({e}); make a new one with unitrain plan "
                                f"... --out {path.name}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, KeyError) as e:
            raise UnitrainError(f"plan file {path} does not match the Plan schema ({e}); make a new one with "
                                f"unitrain plan ... --out {path.name}") from None


def _decode(tp, value):
    """JSON value -> the annotated type: nested dataclasses, Optional[...] and list[dataclass]."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in fields(tp) if f.init}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"unknown field(s) {sorted(unknown)} in {tp.__name__}")
        return tp(**{k: _decode(hints[k], v) for k, v in value.items()})
    if origin is list and args and is_dataclass(args[0]):
        return [_decode(args[0], v) for v in value]
    return value
