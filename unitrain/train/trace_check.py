"""The trace next to the formula, and what `unitrain plan --trace` does with the difference.

`unitrain.train.trace` measures a step on fake tensors; this module lines its phases up with
`unitrain.plan.memory.estimate_memory`'s (compare, comparison_lines), turns a disagreement into calibration factors
per model family × method × checkpointing (trace_factors, stored by trace_and_record in the calibration store, kind
"trace"), and re-plans with them: the planner reads them from the store from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from unitrain.plan.memory import LoraSpec, MemoryEstimate, estimate_memory
from unitrain.plan.schema import Execution
from unitrain.train.trace import (CANNOT_SEE, CANNOT_SEE_CPU, GiB, PhasePeak, TraceError, TraceResult, trace_memory,
                                  untraceable)


# ------------------------------------------------------------------------------------------------------------------
# Trace next to formula
# ------------------------------------------------------------------------------------------------------------------

UNTRACED = ("comm_buffers", "zero3_gathered", "offload_staging")  # DDP/DeepSpeed buffers: no single-process trace


def _kind(phase: str) -> str:
    """'layers backward, micro-batch 2' (trace) and 'layers backward (top layer)' (formula) -> 'layers backward'."""
    return phase.split(",")[0].split(" (")[0]


def formula_phases(est: MemoryEstimate) -> dict[str, tuple[int, str]]:
    """The formula's allocated bytes per phase kind (largest moment of each kind), without untraced buffers."""
    untraced = sum(c.bytes for c in est.components if c.name in UNTRACED and c.device == "gpu")
    out: dict[str, tuple[int, str]] = {}
    for ph, total in est.phases.items():
        k = _kind(ph)
        if k not in out or total - untraced > out[k][0]:
            out[k] = (total - untraced, ph)
    return out


def trace_phases(trace: TraceResult) -> dict[str, PhasePeak]:
    out: dict[str, PhasePeak] = {}
    for p in trace.phases:
        k = _kind(p.phase)
        if k not in out or p.total > out[k].total:
            out[k] = p
    return out


@dataclass
class Comparison:
    rows: list[tuple]  # (what, trace bytes, formula bytes, detail)
    peak_error: float  # (formula − trace) / trace of the allocated peak
    trace_peak_phase: str
    formula_peak_phase: str


def compare(trace: TraceResult, est: MemoryEstimate) -> Comparison:
    """Each category and each phase's peak, traced next to predicted (allocated bytes: no context/fragmentation)."""
    by = {c.name: c.bytes for c in est.components if c.device == "gpu"}
    loss = next((c.inputs.get("saved", 0) for c in est.components if c.name == "logits_loss"), 0)
    ll = next((c for c in est.components if c.name == "logits_loss"), None)
    held = ll.inputs["alive"].get("layers backward (top layer)", 0) if ll is not None and "alive" in ll.inputs else 0
    saved = by.get("activations", 0) + loss + held + next(
        (c.inputs["saved"] for c in est.components if c.name == "autocast_weight_copies"), 0)
    rows = [("weights", trace.weights, by.get("weights", 0) + by.get("adapters", 0), ""),
            ("gradients", trace.gradients, by.get("gradients", 0), ""),
            ("optimizer", trace.optimizer, by.get("optimizer", 0), ""),
            ("alive after forward", trace.saved_after_forward, saved,
             "saved activations, logits, log-probs, autocast copies outside checkpoints")]
    fp = formula_phases(est)
    for k, tp in trace_phases(trace).items():
        f, moment = fp.get(k, (0, ""))
        rows.append((f"peak of {k}", tp.total, f, f"trace: {tp.phase}{' at ' + tp.where if tp.where else ''}; "
                                                    f"formula: {moment}"))
    t_peak = trace.peak
    f_peak, f_phase = max(fp.values())
    return Comparison(rows, (f_peak - t_peak.total) / t_peak.total, t_peak.phase + (f" at {t_peak.where}" if
                                                                                   t_peak.where else ""), f_phase)


def comparison_lines(trace: TraceResult, est: MemoryEstimate) -> list[str]:
    cmp = compare(trace, est)
    lines = [f"trace: {trace.model_type}, {trace.params / 1e6:.1f}M params ({trace.trainable / 1e6:.2f}M trainable), "
             f"{trace.strategy.method}, checkpointing {trace.strategy.checkpointing}, {trace.strategy.micro_batch_size}"
             f" × {trace.seq_len} tokens × {trace.strategy.grad_accum} micro-batches, {trace.strategy.dtype}; two "
             f"steps on fake tensors in {trace.seconds:.0f} s (the second shown)",
             f"  {'':<28}{'trace GiB':>10}{'formula GiB':>12}{'error':>9}"]
    for what, t, f, detail in cmp.rows:
        err = f"{(f - t) / t:+.1%}" if t else ("0" if not f else "n/a")
        lines.append(f"  {what:<28}{t / GiB:>10.3f}{f / GiB:>12.3f}{err:>9}" + (f"  {detail}" if detail else ""))
    lines.append(f"  peak: trace in {cmp.trace_peak_phase}, formula in {cmp.formula_peak_phase}; formula − trace "
                 f"= {cmp.peak_error:+.2%} of the allocated peak")
    lines.append(f"  first step (optimizer states not yet allocated): peak {trace.first_step_peak / GiB:.3f} GiB")
    lines += [f"  note: {n}" for n in trace.notes]
    lines.append(f"  {CANNOT_SEE_CPU if trace.on_cpu else CANNOT_SEE}")
    return lines


# ------------------------------------------------------------------------------------------------------------------
# `unitrain plan --trace`, and the trace's numbers for the planner
# ------------------------------------------------------------------------------------------------------------------

def trace_and_record(plan, recipe, data_stats=None, rounds: int = 3):
    """`unitrain plan --trace`: trace the chosen strategy and a close runner-up (candidates_to_trace), store where
    trace and formula disagree for this model family × method × checkpointing (calibration store, kind "trace";
    an agreeing trace removes an older entry), and plan again with those numbers, which the planner reads from the
    store from now on. When that changes the chosen strategy, trace the new one too (at most `rounds` times).
    -> (report lines, the plan after the trace: `plan` itself when the trace changed nothing). The factors are
    measured without the fused kernels (they do not run on fake tensors) and applied to the family's plans with or
    without them."""
    from unitrain.plan import make_plan
    from unitrain.plan.shape import load_model_config, shape_from_config

    config, _ = load_model_config(recipe.model, recipe.base_dir)
    if recipe.model.max_layers:
        config = dict(config, num_hidden_layers=min(recipe.model.max_layers, config["num_hidden_layers"]))
    shape, lines, done = shape_from_config(config), [], set()
    for _ in range(rounds):
        for i, st in enumerate(_to_trace(plan, recipe, shape)):
            key = (st.method, str(st.checkpointing), st.micro_batch_size, st.grad_accum, st.zero_stage)
            if key in done:
                continue
            done.add(key)
            if i:
                lines.append(f"runner-up (rejected for memory within 10 % of the limit): {_describe(st)}")
            lines += _trace_one(plan, recipe, config, shape, st, full_report=not lines)
        new = make_plan(recipe, plan.resources, data_stats=data_stats)
        if new.execution == plan.execution:
            break
        lines.append(f"the trace changes the plan: {_describe(plan.execution)} -> {_describe(new.execution)} "
                     f"(peak {new.memory.peak / GiB:.2f} GiB of {new.memory.usable / GiB:.2f} usable)")
        plan = new
    return lines, plan


def _to_trace(plan, recipe, shape) -> list[Execution]:
    """The plan's strategy, and a runner-up the search preferred but rejected for memory within 10 % of the limit."""
    from unitrain.plan.search import search, usable_memory

    fixed = replace(recipe, training=replace(recipe.training, global_batch_size=plan.global_batch_size))
    _, cands, _ = search(fixed, plan.resources, shape, plan.seq_len)
    chosen = [c for c in cands if c.feasible and _same(c.strategy, plan.execution)]
    usable = usable_memory(plan.resources.gpu_memory, plan.resources.on_cpu)
    picked = candidates_to_trace(chosen[0], cands, usable, recipe.methods) if chosen else []
    return [replace(c.strategy, kernels=[]) for c in picked] or [replace(plan.execution, kernels=[])]


def _trace_one(plan, recipe, config: dict, shape, st: Execution, full_report: bool) -> list[str]:
    """Trace one strategy, compare it with the formula and store (or clear) the family's factors for it."""
    from unitrain.plan import calibrate

    lora = LoraSpec.of(recipe.method.lora)
    try:
        trace = trace_memory(config, st, plan.seq_len, lora, plan.resources.on_cpu, recipe.training.max_grad_norm)
    except TraceError as e:
        return [str(e)]
    if plan.execution.kernels:
        trace.notes.insert(0, f"the plan's fused kernels ({'+'.join(plan.execution.kernels)}) do not run on fake "
                              f"tensors: traced and predicted without them")
    if plan.world_size > 1:
        trace.notes.append(f"one process traced; DDP's gradient buckets across the {plan.world_size} ranks are "
                           f"the formula's comm_buffers, left out of the comparison")
    est = estimate_memory(shape, st, plan.seq_len, plan.world_size, plan.resources.gpus_per_node,
                          plan.resources.on_cpu, lora)
    lines = comparison_lines(trace, est) if full_report else [
        f"trace of {_describe(st)}: peak {trace.peak.total / GiB:.3f} GiB, formula {est.allocated_peak / GiB:.3f} GiB"]
    factors = trace_factors(trace, est)
    key = calibrate.trace_key(shape, st.method, st.checkpointing)
    if factors:
        calibrate.record_trace(key, factors, f"unitrain plan --trace ({recipe.name})",
                               {"trace_peak": trace.peak.total, "formula_peak": est.allocated_peak,
                                "seq_len": plan.seq_len, "micro_batch": st.micro_batch_size})
        lines.append(f"  stored for this model family, {st.method}, checkpointing {st.checkpointing}: "
                     + ", ".join(f"{k} ×{v:.4g}" for k, v in sorted(factors.items()))
                     + " (later plans use the trace's numbers; `unitrain calibrate --list` shows them)")
    else:
        if calibrate.lookup(key):
            calibrate.reset(key)
        lines.append("  the formula matches the trace within 1 % here: nothing stored")
    return lines


def _same(a: Execution, b: Execution) -> bool:
    keys = ("method", "zero_stage", "offload_optimizer", "offload_params", "optimizer", "checkpointing",
            "micro_batch_size", "grad_accum")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _describe(st: Execution) -> str:
    return (f"{st.method}, ZeRO-{st.zero_stage}, {st.optimizer}, checkpointing {st.checkpointing}, "
            f"micro-batch {st.micro_batch_size}×{st.grad_accum}")


TRACE_TOLERANCE = 0.01  # below 1 % the formula is kept: the trace's residue is allocator-irrelevant


def scaled_peak(est: MemoryEstimate, factors: dict) -> int:
    """The estimate's allocated peak (untraced buffers left out) after scaling components as `scale` would."""
    from copy import deepcopy

    from unitrain.plan.memory import peak_of

    comps = deepcopy([c for c in est.components if c.name not in UNTRACED])
    for c in comps:
        f = factors.get(c.name)
        if f:
            c.bytes = int(c.bytes * f)
            if "alive" in c.inputs:
                c.inputs["alive"] = {ph: int(v * f) for ph, v in c.inputs["alive"].items()}
    return int(peak_of(comps)[0] * factors.get("traced_peak", 1.0))


def trace_factors(trace: TraceResult, est: MemoryEstimate, tolerance: float = TRACE_TOLERANCE) -> dict[str, float]:
    """Where the trace and the formula disagree (beyond `tolerance`), the factors that make the formula give the
    trace's numbers for this model family, keyed as estimate_memory's `scale` keys components:
    - 'weights' (and 'adapters'), 'gradients', 'optimizer': traced / predicted;
    - 'activations': scales the saved activations so that what the forward leaves alive (saved activations, the
      loss's tensors, logits, autocast copies: the trace's 'alive after forward') matches;
    - 'traced_peak': the residual ratio of the allocated peak once those apply (what the phase model misses for an
      architecture it does not know: other transients, another head).
    Empty when the formula matches. Apply with `estimate_memory(..., scale=factors)`: component factors scale
    each component and its bytes alive per phase, then 'traced_peak' scales the allocated peak; `scaled_peak`
    gives the same number from an existing estimate."""
    cmp = compare(trace, est)
    rows = {what: (t, f) for what, t, f, _ in cmp.rows}
    by = {c.name: c.bytes for c in est.components}
    factors: dict[str, float] = {}
    for key in ("weights", "gradients", "optimizer"):
        t, f = rows[key]
        if f and t and abs(t / f - 1) > tolerance:
            factors[key] = round(t / f, 4)
            if key == "weights" and by.get("adapters"):
                factors["adapters"] = factors[key]
    t, f = rows["alive after forward"]
    if by.get("activations") and f and abs(t / f - 1) > tolerance:
        factors["activations"] = round((by["activations"] + t - f) / by["activations"], 4)
    peak = scaled_peak(est, factors)
    if peak and abs(trace.peak.total / peak - 1) > tolerance:
        factors["traced_peak"] = round(trace.peak.total / peak, 4)
    return factors


def config_key(config: dict) -> str:
    """The calibration store's name for a model family (plan/calibrate.py keeps the rule: the planner reads it)."""
    from unitrain.plan.calibrate import family_key
    from unitrain.plan.shape import shape_from_config

    return family_key(shape_from_config(config))


def candidates_to_trace(best, cands: list, usable: int, methods: list[str], margin: float = 0.10) -> list:
    """What a traced plan traces (each trace costs seconds to minutes, so not the whole search): the chosen
    candidate, and the runner-up — the best-ranked traceable candidate the search preferred but rejected for memory
    whose predicted peak is within `margin` of the usable memory (a trace may show it fits)."""
    from unitrain.plan.search import sort_key

    key = sort_key(best, methods)
    near = [c for c in cands if not c.feasible and c.memory.peak <= usable * (1 + margin) and
            sort_key(c, methods) < key and c.reason.startswith("peak") and untraceable(c.strategy) is None]
    return [best] + ([min(near, key=lambda c: sort_key(c, methods))] if near else [])
