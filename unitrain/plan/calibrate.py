"""Calibration: measured beats modelled (DESIGN.md, principle 4). One store, one mapping of categories.

A few real steps measure memory per category and the step time (the trainer measures: train/memory_check.py on
the first step, the median step time over the first steps). The store keeps, per key, what was measured next to
what the model predicted *before* any correction, and their ratio; later plans for the same key scale their
predictions by it (the plan lists what it applied and which run measured it).

- Key: hardware × model × method × precision (`fingerprint`).
- Entry: kind ("run": a training run's measurement; "trace": `unitrain plan --trace`'s factors for a model
  family × method × checkpointing; "curve": a finished run's learning curve), source (the run directory), time, predicted, measured, factors (measured / predicted, kept when in [0.25, 4]), facts (room for
  other measured facts: traced memory, learning-curve priors).
- Categories (`CATEGORIES`): what a measurement can see, mapped onto the plan's memory components in one place.
  ZeRO's gradient partitions, buckets and offload staging are measured with the gradients, so they are
  predicted with them too; a category's factor scales every component in it.
- Location: ~/.cache/unitrain/calibration.json, or $UNITRAIN_CALIBRATION. `unitrain calibrate --list` shows it,
  `unitrain calibrate --reset [KEY]` clears it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STORE_VERSION = 2
SANE_RANGE = (0.25, 4.0)  # factors outside: the model is badly wrong for this setup (or the measurement is): ignore
CATEGORIES = {  # measured category -> the plan's memory components it covers
    "weights": ("weights", "adapters"),
    "gradients": ("gradients", "comm_buffers", "offload_buffers", "offload_staging"),
    "optimizer": ("optimizer",),
    "activations": ("activations",),  # + the loss's saved log-probs, booked under logits_loss (see below)
}


def default_path() -> Path:
    return Path(os.environ.get("UNITRAIN_CALIBRATION", "~/.cache/unitrain/calibration.json")).expanduser()


def fingerprint(accelerator: str, model_name: str, total_params: int, method: str, precision: str) -> str:
    """Hardware + model + method + precision identify a calibration entry."""
    return f"{accelerator}|{model_name or '?'}|{total_params}|{method}|{precision}"


def predicted_categories(components, step_time_s: float | None = None, allocated_peak: int | None = None) -> dict:
    """Predicted bytes per measured category from memory components (MemoryComponent list), plus 'step_time' and
    'peak' (compare with torch.cuda.max_memory_allocated) when given. Saved-for-backward bytes include the loss's
    saved log-probs, which the plan books under logits_loss (inputs['saved'])."""
    by = {c.name: c.bytes for c in components}
    out = {cat: sum(by.get(n, 0) for n in names) for cat, names in CATEGORIES.items()}
    loss = next((c for c in components if c.name == "logits_loss"), None)
    out["activations"] += int(loss.inputs.get("saved", 0)) if loss is not None else 0
    if step_time_s is not None:
        out["step_time"] = step_time_s
    if allocated_peak is not None:
        out["peak"] = allocated_peak
    return out


def activations_at(plan, shape, lora, micro_batch: int, width: int) -> tuple[int, int]:
    """The plan's saved-for-backward bytes of one micro-batch rescaled to the shape actually measured, micro_batch ×
    width: (the plan's number, the model's own before calibration). The plan predicts full-width batches (its peak);
    the trainer trims a batch to its longest sequence, so a measurement is compared at the shape it measured — the
    ratio of the plan's activation formula at the two shapes."""
    from unitrain.plan.memory import activation_bytes, precision_for

    ex = plan.execution
    p = precision_for(ex, plan.resources.on_cpu)
    full = activation_bytes(shape, ex.micro_batch_size, ex.seq_len, ex, p, lora)["total"]
    ratio = activation_bytes(shape, micro_batch, width, ex, p, lora)["total"] / max(1, full)
    return (round(predicted_categories(plan.memory.components)["activations"] * ratio),
            round(plan.calibration.model.get("activations", full) * ratio))


def component_scale(factors: dict) -> dict:
    """Category factors -> factors per memory component (what estimate_memory's `scale` takes)."""
    out = {}
    for cat, names in CATEGORIES.items():
        if cat in factors:
            out.update({n: factors[cat] for n in names})
    return out


@dataclass
class Entry:
    key: str
    kind: str = "run"
    source: str = ""
    time: float = 0.0
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    factors: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)


def _read(path: Path) -> dict[str, Entry]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
        return {}  # an older store divided ZeRO gradient buffers by a prediction without them: not reused
    out = {}
    for key, e in data.get("entries", {}).items():
        try:
            out[key] = Entry(**e)
        except TypeError:
            continue
    return out


def _write(path: Path, entries: dict[str, Entry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"version": STORE_VERSION, "entries": {k: asdict(e) for k, e in entries.items()}},
                              indent=1))
    tmp.replace(path)  # atomic: concurrent readers never see half a file


def entries(path: str | Path | None = None) -> list[Entry]:
    return sorted(_read(Path(path) if path else default_path()).values(), key=lambda e: e.time)


def lookup(key: str, path: str | Path | None = None) -> Entry | None:
    return _read(Path(path) if path else default_path()).get(key)


def record(key: str, predicted: dict, measured: dict, source: str = "", *, kind: str = "run",
           facts: dict | None = None, path: str | Path | None = None) -> Entry:
    """Store measured / predicted for every category present in both; -> the stored entry."""
    path = Path(path) if path else default_path()
    factors = {}
    for cat, pred in predicted.items():
        meas = measured.get(cat)
        if meas is None or not pred:
            continue
        ratio = float(meas) / float(pred)
        if SANE_RANGE[0] <= ratio <= SANE_RANGE[1]:
            factors[cat] = round(ratio, 4)
    data = _read(path)
    entry = Entry(key, kind, str(source), time.time(), dict(predicted), dict(measured), factors, dict(facts or {}))
    data[key] = entry
    _write(path, data)
    return entry


# ------------------------------------------------------------------------------------------------
# Traced memory (`unitrain plan --trace`): factors per model family × method × checkpointing
# ------------------------------------------------------------------------------------------------

def family_key(shape) -> str:
    """A model family as the memory model sees it: model_type, activation and every size of the ModelShape (the
    same whether the shape came from config.json, a GGUF header or a transformers config object), so each plan of
    this architecture and size finds what was traced for it."""
    import hashlib

    act = shape.config.get("hidden_act") or shape.config.get("hidden_activation") or ""
    sizes = [shape.model_type, act, shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads,
             shape.num_kv_heads, shape.head_dim, shape.vocab_size, shape.tied_embeddings, shape.layer_params,
             shape.norms_per_layer, shape.embedding_params, shape.lm_head_params, shape.qk_norm, shape.gated_mlp,
             [(lin.d_in, lin.d_out) for lin in shape.linears]]
    digest = hashlib.sha256(json.dumps(sizes, default=str).encode()).hexdigest()[:16]
    return f"trace|{shape.model_type or '?'}|{digest}"


def trace_key(shape, method: str, checkpointing) -> str:
    """Where a trace's factors are stored: they differ by method (frozen base or not) and by checkpointing (what
    the forward keeps alive), not by batch shape (every component scales with it)."""
    return f"{family_key(shape)}|{method}|ckpt={checkpointing}"


def record_trace(key: str, factors: dict, source: str, facts: dict | None = None,
                 path: str | Path | None = None) -> Entry:
    """Store `trace.trace_factors` (component factors and 'traced_peak'; empty = the formula was right)."""
    path = Path(path) if path else default_path()
    data = _read(path)
    data[key] = Entry(key, "trace", source, time.time(), factors=dict(factors), facts=dict(facts or {}))
    _write(path, data)
    return data[key]


def traced_scales(shape, path: str | Path | None = None) -> dict[tuple[str, str], Entry]:
    """Every stored trace of this model family: {(method, checkpointing): entry}."""
    prefix = family_key(shape) + "|"
    out = {}
    for key, e in _read(Path(path) if path else default_path()).items():
        if e.kind == "trace" and key.startswith(prefix):
            method, ckpt = key[len(prefix):].split("|ckpt=", 1)
            out[(method, ckpt)] = e
    return out


def reset(key: str | None = None, path: str | Path | None = None) -> int:
    """Forget one entry (or all); -> how many were removed."""
    path = Path(path) if path else default_path()
    data = _read(path)
    if key is None:
        n = len(data)
        data = {}
    else:
        n = int(data.pop(key, None) is not None)
    _write(path, data)
    return n


# ------------------------------------------------------------------------------------------------
# CPU byte accounting
# ------------------------------------------------------------------------------------------------

def _storage_key(t):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def measure_cpu_memory(model, batch: dict, optimizer=None, loss_fn=None) -> dict:
    """Exact bytes of one training step on CPU, by category.

    - parameters / trainable / gradients / optimizer: tensor bytes (storage-deduplicated, so tied weights count
      once); gradients after backward; optimizer state after one `optimizer.step()` when an optimizer is given.
    - activations: every tensor autograd saves for backward during the forward (torch.autograd.graph.
      saved_tensors_hooks), deduplicated by storage, excluding parameter storages. Checkpointed layers
      (non-reentrant checkpointing hides their internals from outer hooks) contribute their inputs, recorded by
      a forward pre-hook on each layer that has gradient checkpointing on.
    Returns bytes: {'parameters', 'trainable', 'gradients', 'optimizer', 'activations', 'activation_tensors'}.
    """
    import torch

    params = {}
    for p in model.parameters():
        params.setdefault(_storage_key(p), p.untyped_storage().nbytes())
    param_keys = set(params)
    trainable = {}
    for p in model.parameters():
        if p.requires_grad:
            trainable.setdefault(_storage_key(p), p.untyped_storage().nbytes())
    saved: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _storage_key(t)
            if key not in param_keys and key[0] != 0:
                saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    def checkpoint_input(module, args, kwargs):  # a checkpointed layer keeps its inputs: hidden states, rotary
        x = args[0] if args else kwargs.get("hidden_states")
        for t in [x, *(kwargs.get("position_embeddings") or ())]:
            if isinstance(t, torch.Tensor):
                pack(t)

    hooks = [m.register_forward_pre_hook(checkpoint_input, with_kwargs=True) for m in model.modules()
             if getattr(m, "gradient_checkpointing", False) is True and m.training and
             type(m).__name__.endswith(("DecoderLayer", "Block"))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
            loss = loss_fn(out) if loss_fn else out.loss
    finally:
        for h in hooks:
            h.remove()
    activations = sum(saved.values())
    n_saved = len(saved)
    loss.backward()
    grads = {}
    for p in model.parameters():
        if p.grad is not None:
            grads.setdefault(_storage_key(p.grad), p.grad.untyped_storage().nbytes())
    opt_bytes = 0
    if optimizer is not None:
        optimizer.step()
        seen = set()
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    k = _storage_key(v)
                    if k not in seen:
                        seen.add(k)
                        opt_bytes += v.untyped_storage().nbytes()
    return {"parameters": sum(params.values()), "trainable": sum(trainable.values()),
            "gradients": sum(grads.values()), "optimizer": opt_bytes, "activations": activations,
            "activation_tensors": n_saved}
