"""Calibration: measured beats modelled (DESIGN.md, principle 4).

A few real steps measure peak memory and step time (the trainer does the measuring: on CUDA with
torch.cuda.max_memory_allocated, on CPU with `measure_cpu_memory` below). `record_calibration` stores the
ratio measured / predicted per component and for the step time, keyed by a hardware + model fingerprint,
in ~/.cache/unitrain/calibration.json (or $UNITRAIN_CALIBRATION, or a path given); later plans for the same
fingerprint scale their predictions by those factors (`factors_for`, used by the planner) and
`apply_calibration` rescales an existing Plan.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from unitrain.plan.schema import Plan

# Factors outside this range mean the model is badly wrong for this setup (or the measurement is): ignore them.
_SANE = (0.25, 4.0)


def default_path() -> Path:
    return Path(os.environ.get("UNITRAIN_CALIBRATION", "~/.cache/unitrain/calibration.json")).expanduser()


def fingerprint(accelerator: str, model_name: str, total_params: int, method: str, dtype: str) -> str:
    """Hardware + model (+ method and dtype, which change what is kept) identify a calibration entry."""
    return f"{accelerator}|{model_name or '?'}|{total_params}|{method}|{dtype}"


def plan_fingerprint(plan: Plan) -> str:
    return plan.calibration_key


def predicted_from_plan(plan: Plan) -> dict:
    """The plan's numbers under the keys measurements use: 'peak' (compare with torch.cuda.max_memory_allocated),
    'step_time', and per category 'weights', 'gradients', 'optimizer', 'activations' (saved-for-backward bytes,
    the loss's saved log-probs included, as `measure_cpu_memory` counts them)."""
    by = {c.name: c for c in plan.memory}

    def b(name):
        return by[name].bytes if name in by else 0

    loss_saved = by["logits_loss"].inputs.get("saved", 0) if "logits_loss" in by else 0
    return {"peak": plan.predicted_allocated, "step_time": plan.step_time_s,
            "weights": b("weights") + b("adapters"), "gradients": b("gradients"), "optimizer": b("optimizer"),
            "activations": b("activations") + loss_saved}


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def record_calibration(fingerprint: str, predicted: dict, measured: dict, path: str | Path | None = None) -> dict:
    """Store measured/predicted ratios for every key present in both (e.g. 'peak', 'activations', 'step_time').

    Returns the stored factors. Ratios outside [0.25, 4] are dropped: they point at a broken measurement.
    """
    path = Path(path) if path else default_path()
    factors = {}
    for key, pred in predicted.items():
        meas = measured.get(key)
        if meas is None or not pred:
            continue
        ratio = float(meas) / float(pred)
        if _SANE[0] <= ratio <= _SANE[1]:
            factors[key] = round(ratio, 4)
    data = _load(path)
    data[fingerprint] = {"factors": factors, "predicted": predicted, "measured": measured, "time": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: concurrent readers never see half a file
    return factors


def factors_for(fingerprint: str, path: str | Path | None = None) -> dict:
    return dict(_load(Path(path) if path else default_path()).get(fingerprint, {}).get("factors", {}))


def apply_calibration(plan: Plan, factors: dict | None = None, path: str | Path | None = None) -> Plan:
    """Scale a plan's memory components and step time by stored factors (in place; returns the plan).

    Component factors are keyed by component name; 'step_time' scales the step time and 'peak' the peak when
    no per-component factor exists. Usable with plans made before the calibration was recorded.
    """
    if factors is None:
        factors = factors_for(plan_fingerprint(plan), path)
    if not factors or plan.calibration:
        return plan
    per_component = any(c.name in factors for c in plan.memory)
    for c in plan.memory:
        f = factors.get(c.name)
        if f:
            c.bytes = int(c.bytes * f)
            c.inputs["calibration_factor"] = f
    if per_component:
        plan.peak_memory = _peak(plan)
    elif "peak" in factors:
        plan.peak_memory = int(plan.peak_memory * factors["peak"])
    if "step_time" in factors:
        plan.step_time_s *= factors["step_time"]
    plan.calibration = dict(factors)
    return plan


def _peak(plan: Plan) -> int:
    gpu = [c for c in plan.memory if c.device == "gpu"]
    always = sum(c.bytes for c in gpu if c.inputs.get("phase", "always") == "always" and c.name != "overhead")
    phases = max(sum(c.bytes for c in gpu if c.inputs.get("phase") == ph) for ph in ("fwd_bwd", "step"))
    over = sum(c.bytes for c in gpu if c.name == "overhead")
    return always + phases + over


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
