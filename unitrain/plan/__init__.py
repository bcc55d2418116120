"""The planner: recipe + resources + model shape (+ data statistics) -> Plan. Pure: no CUDA, no weights.

`make_plan` is the one entry point the trainer and the CLI call. The search is in search.py (with its
tie-breaks), the memory model in memory.py, the compute model in compute.py, the spending of the budget
(length, data, evals) in allocate.py, the DeepSpeed engine config in deepspeed.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

from unitrain.errors import PlanError
from unitrain.plan import allocate, calibrate, compute
from unitrain.plan.deepspeed import engine_config
from unitrain.plan.memory import GiB, LoraSpec, estimate_memory, precision_for
from unitrain.plan import quality
from unitrain.plan.schema import (CalibrationUse, Compute, DataStats, Execution, MemoryComponent, MemoryPlan,
                                  ModelSummary, Plan, Prediction)
from unitrain.plan.search import Candidate, rejected_alternatives, sort_key, usable_memory
from unitrain.plan.search import search as run_search
from unitrain.plan.shape import ModelShape, model_shape

__all__ = ["make_plan", "Plan", "Execution", "DataStats", "MemoryComponent", "ModelShape", "model_shape"]


def _infeasible(recipe, spec, shape, cands: list[Candidate], seq_len: int, refusals: list[str]) -> PlanError:
    if not cands:
        return PlanError("no strategy to evaluate: " + "; ".join(refusals))
    usable = usable_memory(spec.gpu_memory, spec.on_cpu)
    cpu_usable = usable_memory(spec.cpu_memory, True)
    unit = "CPU" if spec.on_cpu else "GPU"
    host_ok = [c for c in cands if spec.on_cpu or c.memory.cpu_needed <= cpu_usable]
    small = min(host_ok or cands, key=lambda c: c.memory.peak)
    need = small.memory.peak
    total = need / 0.9 if spec.on_cpu else max(need / (1 - 0.05), need + GiB)
    msg = [f"nothing fits in {spec.gpu_memory / GiB:.1f} GiB per {unit} (usable {usable / GiB:.1f} GiB) × "
           f"{spec.world_size}.",
           f"Smallest footprint found: {need / GiB:.1f} GiB peak per {unit} with {small.describe()}; it would fit "
           + (f"in {math.ceil(total / GiB)} GiB of CPU memory (to plan for GPUs instead: --gpus N and --accelerator NAME, "
              f"i.e. resources.gpus_per_node and resources.accelerator)" if spec.on_cpu else
              f"with resources.gpu_memory >= {math.ceil(total / GiB)}GiB")]
    more = None if spec.on_cpu else _more_gpus(recipe, spec, shape, seq_len)
    msg[-1] += (f", or on {more} GPUs of this size." if more else ".")
    host_bound = [c for c in cands if c.memory.peak <= usable]  # fit the GPU, not the host
    if host_bound and not spec.on_cpu:
        c = min(host_bound, key=lambda c: c.memory.cpu_needed)
        msg.append(f"With {c.describe()} it fits the GPU but needs {c.memory.cpu_needed / GiB:.0f} GiB of CPU memory "
                   f"per node: set resources.cpu_memory >= {math.ceil(c.memory.cpu_needed / 0.9 / GiB)}GiB.")
    tips = []
    if recipe.training.micro_batch_size != 1 and small.strategy.micro_batch_size > 1:
        tips.append("training.micro_batch_size=1")
    if recipe.training.gradient_checkpointing not in ("auto", "full"):
        tips.append("training.gradient_checkpointing=full")
    if "qlora" not in recipe.methods:
        tips.append("method.name=qlora")
    if tips:
        msg.append("Also worth trying: " + ", ".join(tips) + ".")
    msg += refusals
    summary = (f"needs {need / GiB:.1f} GiB per {unit}, {usable / GiB:.1f} usable" if not host_bound or spec.on_cpu
               else f"needs {min(c.memory.cpu_needed for c in host_bound) / GiB:.0f} GiB of CPU memory per node to "
                    f"offload")
    return PlanError(" ".join(msg), fix=" ".join(msg[1:]), summary=summary)


def _more_gpus(recipe, spec, shape, seq_len: int) -> int | None:
    G = recipe.training.global_batch_size
    for n in (2, 4, 8, 16, 32, 64, 128):
        if n <= spec.world_size or G % n:
            continue
        wider = replace(spec, gpus_per_node=min(n, 8) if not spec.on_cpu else 0, nodes=max(1, n // 8))
        if wider.world_size != n:
            continue
        try:
            best, _, _ = run_search(recipe, wider, shape, seq_len)
        except PlanError:
            return None
        if best is not None:
            return n
    return None


def _cleaning_note(stats: DataStats) -> str:
    kept, raw = stats.n_examples, stats.raw_examples
    why = ", ".join(f"{k} {v}" for k, v in sorted(stats.dropped.items(), key=lambda kv: -kv[1]))
    note = f"cleaning: {kept:,} of {raw:,} examples kept ({stats.total_tokens:,} of {stats.raw_tokens:,} tokens); dropped: {why}"
    if stats.dropped.get("too_long", 0) > 0.1 * max(1, raw):
        note += (f". Many examples are longer than data.max_length={stats.seq_len} (their answers would be cut): "
                 f"raise data.max_length, or keep them with data.clean=false")
    return note


def _scale(factors: dict) -> dict:
    """Calibration factors per category -> the memory model's per-component scale (+ step_time, peak)."""
    return {**calibrate.component_scale(factors), **{k: factors[k] for k in ("step_time", "peak") if k in factors}}


def _outcomes(recipe, spec, shape, cands, stats, seq_len) -> dict:
    """Each feasible candidate's allocation of the budget and its predicted outcome: {id: (allocation, forward
    FLOPs per slot, score)}. The score (lower is better) is the predicted loss where stored curves exist for every
    method in play, else −log(effective tokens): under the prior every method learns equally per effective token,
    so more effective tokens within the budget predict a lower loss whatever the curve."""
    out, first_error = {}, None
    for c in cands:
        if not c.feasible:
            continue
        lora = c.memory.trainable_params if c.strategy.method != "full" else 0
        fps = compute.forward_flops_per_token(shape, seq_len, lora)
        try:
            alloc = allocate.spend(recipe, spec, c.strategy.micro_batch_size, c.flops_per_token, c.time.total, fps,
                                   stats, seq_len)
        except PlanError as e:  # the budget does not buy one step of this candidate
            first_error = first_error or e
            continue
        out[id(c)] = [alloc, fps, None]
    if not out and first_error is not None:
        raise first_error
    curves = {m: quality_entry(recipe, shape, m, stats) for m in recipe.methods}
    with_curve = all(curves[c.strategy.method] is not None for c in cands if id(c) in out)
    for c in cands:
        if id(c) in out:
            alloc = out[id(c)][0]
            if with_curve:
                out[id(c)][2] = quality.predict_from(curves[c.strategy.method].facts, alloc.effective_tokens)[0]
            else:
                out[id(c)][2] = -math.log(max(1.0, alloc.effective_tokens))
    return out


def quality_entry(recipe, shape, method: str, stats):
    """The stored learning curve of an earlier run on this model, method, learning rate and data, if any."""
    if stats is None or not stats.fingerprint:
        return None
    entry = calibrate.lookup(_curve_key(recipe, shape, method, stats))
    return entry if entry is not None and entry.kind == "curve" else None


def _curve_key(recipe, shape, method, stats) -> str:
    return quality.curve_key(shape.name, shape.total_params, method, recipe.training.lr,
                             stats.fingerprint if stats is not None else "")


def _prediction(recipe, shape, method, stats, alloc) -> Prediction:
    key = _curve_key(recipe, shape, method, stats)
    entry = quality_entry(recipe, shape, method, stats)
    if entry is None:
        why = ("no measured learning curve for this model, method, learning rate and data yet: the level of the loss "
               "is unknown until the run's first evals (it then reports a refined prediction); alternatives were "
               "compared by the effective tokens they train")
        return Prediction(effective_tokens=alloc.effective_tokens, source="prior", key=key, detail=why)
    loss, low, high = quality.predict_from(entry.facts, alloc.effective_tokens)
    return Prediction(loss=loss, low=low, high=high, effective_tokens=alloc.effective_tokens, source=entry.source,
                      cooldown_factor=entry.facts.get("cooldown_factor", 1.0),
                      key=key, detail=f"from the learning curve measured in {entry.source} "
                                      f"({entry.facts.get('n', '?')} evals), at {alloc.effective_tokens:,.0f} "
                                      f"effective tokens, times that run's cooldown factor "
                                      f"{entry.facts.get('cooldown_factor', 1):.3f}")


def make_plan(recipe, spec=None, model_config=None, data_stats: DataStats | None = None,
              world_size: int | None = None) -> Plan:
    """Choose strategy, batch shape, length, data and evals for `recipe` on `spec`. Raises PlanError when
    nothing fits."""
    from unitrain.resources import resolve_resources

    if spec is None:
        spec = resolve_resources(recipe.resources, world_size)
    elif world_size is not None and world_size > 1 and world_size != spec.world_size:
        raise PlanError(f"the launcher started {world_size} processes but the resource spec has "
                        f"{spec.world_size} ranks; make resources.gpus_per_node × nodes match the launcher")
    shape = model_shape(recipe.model, model_config, recipe.base_dir)
    seq_len = data_stats.seq_len if data_stats is not None else recipe.data.max_length
    batch_note = None
    if recipe.training.global_batch_size == "auto":  # a planner decision: resolve it before the search
        fps = compute.flops_per_token(shape, recipe.methods[0], seq_len, "off",
                                      shape.lora_params(recipe.method.lora.r, recipe.method.lora.target_modules)
                                      if recipe.methods[0] != "full" else 0)
        G, batch_note = allocate.choose_global_batch(recipe, spec, data_stats, fps)
        recipe = replace(recipe, training=replace(recipe.training, global_batch_size=G))
    precision_key = "float32" if spec.on_cpu else "16bit"
    keys = {m: calibrate.fingerprint(spec.accelerator, shape.name, shape.total_params, m, precision_key)
            for m in recipe.methods}
    stored = {m: calibrate.lookup(k) for m, k in keys.items()}
    scales: dict = {m: _scale(e.factors) if e else {} for m, e in stored.items()}
    # A trace of this model family (`unitrain plan --trace`) corrects the formula where no run has measured it yet:
    # per method and checkpointing, what the search reads before the method's own factors.
    traced = {mc: e for mc, e in calibrate.traced_scales(shape).items()
              if mc[0] in scales and not stored[mc[0]] and e.factors}
    scales.update({mc: dict(e.factors) for mc, e in traced.items()})
    best, cands, refusals = run_search(recipe, spec, shape, seq_len, scales)
    if best is None:
        raise _infeasible(recipe, spec, shape, cands, seq_len, refusals)
    outcomes = _outcomes(recipe, spec, shape, cands, data_stats, seq_len) if spec.budget is not None else {}
    if outcomes:  # the lowest predicted loss at the budget wins; the search's order breaks ties
        best = min((c for c in cands if id(c) in outcomes),
                   key=lambda c: (round(outcomes[id(c)][2], 3), sort_key(c, recipe.methods)))
    notes: list[str] = list(refusals) + ([f"batch: {batch_note}"] if batch_note else [])
    t = recipe.training
    lora = LoraSpec.of(recipe.method.lora)
    st = replace(best.strategy, precision=precision_for(best.strategy, spec.on_cpu).name,
                 world_size=spec.world_size, global_batch_size=t.global_batch_size, seq_len=seq_len)
    st = replace(st, deepspeed=engine_config(st, hidden_size=shape.hidden_size, on_cpu=spec.on_cpu,
                                             max_grad_norm=t.max_grad_norm))
    lora_params = best.memory.trainable_params if st.method != "full" else 0
    forward_fps = compute.forward_flops_per_token(shape, seq_len, lora_params)
    alloc = outcomes[id(best)][0] if outcomes else allocate.spend(
        recipe, spec, st.micro_batch_size, best.flops_per_token, best.time.total, forward_fps, data_stats, seq_len)
    notes += alloc.notes
    if alloc.evals.sequences and not alloc.evals.stop_rule:
        notes.append(f"evals: {alloc.evals.reason}")
    if data_stats is not None and data_stats.dropped:
        notes.append(_cleaning_note(data_stats))
    if st.kernels:
        notes.append("kernels: fused RMSNorm/RoPE/SwiGLU and a chunked linear-cross-entropy (no b·s·V logits)"
                     + ("; LoRA layers as one GEMM with the low-rank update in its epilogue (same saved tensors)"
                        if "lora" in st.kernels else ""))
    notes.append(f"usable memory = {'CPU memory − 10 %' if spec.on_cpu else 'GPU memory − max(5 %, 1 GiB)'} "
                 "(allocator variance, other processes); predicted peak includes context and fragmentation")
    notes.append(f"step time: {best.time.compute:.3g} s compute at {best.time.mfu:.0%} MFU + "
                 f"{best.time.communication:.3g} s exposed communication + {best.time.offload:.3g} s offload")
    entry, scale = stored[st.method], scales[st.method]
    trace = traced.get((st.method, str(st.checkpointing)))
    # What later measurements are divided by: the model's own prediction, before any stored factor (dividing by
    # a corrected prediction would store the residual and undo the correction on the next plan).
    raw = estimate_memory(shape, best.strategy, seq_len, spec.world_size, spec.gpus_per_node, spec.on_cpu,
                          lora) if scale or trace else best.memory
    raw_time = compute.step_time(shape, best.strategy, seq_len, t.global_batch_size, best.flops_per_token, spec,
                                 raw.trainable_params).total if scale else best.time.total
    raw_pred = calibrate.predicted_categories(raw.components, raw_time, raw.allocated_peak)
    calib = CalibrationUse(key=keys[st.method], factors=dict(entry.factors) if entry else {},
                           source=entry.source if entry else "", time=entry.time if entry else 0.0,
                           model=raw_pred,
                           traced={"key": trace.key, "factors": trace.factors, "source": trace.source,
                                   "time": trace.time} if trace else {})
    tm = best.time
    return Plan(
        model=ModelSummary(name=shape.name, model_type=shape.model_type, params=shape.total_params,
                           trainable_params=best.memory.trainable_params, layers=shape.num_layers,
                           hidden_size=shape.hidden_size, vocab_size=shape.vocab_size, source=shape.source),
        resources=spec, execution=st, length=alloc.length,
        compute=Compute(flops_per_slot=best.flops_per_token, forward_flops_per_slot=forward_fps,
                        flops_per_step=best.flops_per_token * alloc.length.slots_per_step, step_time_s=tm.total,
                        compute_s=tm.compute,
                        communication_s=tm.communication, offload_s=tm.offload, mfu=tm.mfu),
        memory=MemoryPlan(components=best.memory.components, peak=best.memory.peak,
                          allocated_peak=best.memory.allocated_peak,
                          usable=usable_memory(spec.gpu_memory, spec.on_cpu), cpu_needed=best.memory.cpu_needed,
                          peak_phase=best.memory.peak_phase),
        data=alloc.data, evals=alloc.evals, budget=alloc.budget,
        prediction=_prediction(recipe, shape, st.method, data_stats, alloc), calibration=calib,
        rejected=rejected_alternatives(best, cands, recipe.methods, outcomes), notes=notes)
