"""The planner: recipe + resources + model shape (+ data statistics) -> Plan. Pure: no CUDA, no weights.

`make_plan` is the one entry point the trainer and the CLI call. The search is in search.py (with its
tie-breaks), the memory model in memory.py, the compute model in compute.py.
"""

from __future__ import annotations

import math

from unitrain.errors import PlanError
from unitrain.plan import calibrate
from unitrain.plan.memory import GiB
from unitrain.plan.schema import DataStats, MemoryComponent, Plan, Strategy
from unitrain.plan.search import Candidate, rejected_alternatives, usable_memory
from unitrain.plan.search import search as run_search
from unitrain.plan.shape import ModelShape, model_shape

EPOCH_CAP = 4  # Muennighoff et al. 2023: repeated data is worth nearly as much as fresh up to ~4 epochs

__all__ = ["make_plan", "Plan", "Strategy", "DataStats", "MemoryComponent", "ModelShape", "model_shape", "EPOCH_CAP"]


def _length(recipe, spec, best: Candidate, data: DataStats | None, seq_len: int, notes: list[str]) -> tuple[int, dict]:
    """max_steps and the data decision, from (in priority) max_steps, the budget, epochs × data."""
    t = recipe.training
    G = t.global_batch_size
    flops_step = best.flops_per_token * G * seq_len
    data_info: dict = {}
    if t.max_steps:
        steps = t.max_steps
        notes.append(f"length: training.max_steps = {steps}")
    elif spec.budget is not None:
        b = spec.budget
        if b.kind == "flops":
            per_step, unit = flops_step, f"{flops_step:.3g} FLOPs"
        elif b.kind == "gpu_hours":
            per_step = best.time.total * spec.world_size / 3600
            unit = f"{per_step:.3g} GPU-hours"
        else:  # a token budget counts training tokens only
            per_step, unit = G * seq_len, f"{G * seq_len} tokens"
        # One eval forwards the eval split once: 1/3 of a training step's cost per token (no backward), charged
        # at step 0, every eval_every steps and at the end, as the governor charges it.
        eval_tokens = data.eval_tokens if data is not None and b.kind != "tokens" else 0
        if eval_tokens and t.eval_max_batches:
            eval_tokens = min(eval_tokens, t.eval_max_batches * best.strategy.micro_batch_size * spec.world_size
                              * seq_len)
        per_eval = per_step * eval_tokens / (3 * G * seq_len)

        def cost(n: int) -> float:
            evals = 2 + (n - 1) // t.eval_every if t.eval_every else 2
            return n * per_step + evals * per_eval

        steps = max(0, int((b.value - 2 * per_eval) / (per_step + (per_eval / t.eval_every if t.eval_every else 0))))
        while steps > 0 and cost(steps) > b.value:
            steps -= 1
        while cost(steps + 1) <= b.value:
            steps += 1
        if steps < 1:
            evals = f" plus two evals of {per_eval:.3g} each" if per_eval else ""
            raise PlanError(f"resources.budget={b} is too small for a single optimizer step, which costs {unit}"
                            f"{evals} (global batch {G} × {seq_len} tokens); raise the budget, e.g. resources.budget="
                            f"{_budget_example(b.kind, unit)}, or lower training.global_batch_size")
        if per_eval:
            spent = cost(steps) - steps * per_step
            notes.append(f"length: budget {b} − evals {spent:.3g} ({spent / b.value:.1%}; "
                         f"{eval_tokens} tokens each, a forward only) / {unit} per step = {steps} steps")
        else:
            notes.append(f"length: budget {b} / {unit} per step = {steps} steps")
        if data is not None and data.n_sequences:
            cap = max(1, math.floor(EPOCH_CAP * data.n_sequences / G))
            if steps > cap:
                notes.append(f"capped at {EPOCH_CAP} epochs ({cap} steps): repeating data beyond ~4 epochs pays "
                             f"little (Muennighoff et al. 2023); the rest of the budget is left unspent")
                steps = cap
    elif data is not None and data.n_sequences:
        epochs = t.epochs or 1.0
        steps = max(1, math.ceil(epochs * data.n_sequences / G))
        notes.append(f"length: {epochs:g} epochs × {data.n_sequences} sequences / global batch {G} = {steps} steps")
        if epochs > EPOCH_CAP:
            notes.append(f"training.epochs={epochs:g} is above {EPOCH_CAP}: returns from repeated data fall off "
                         f"(Muennighoff et al. 2023); kept because it was set explicitly")
    else:
        steps = 0
        notes.append("length: set once the data is scanned (training.epochs × sequences / global batch); no "
                     "budget and no training.max_steps given")
    if data is not None and data.n_sequences:
        used = min(data.n_sequences, steps * G)
        frac = used / data.n_sequences
        policy = "all" if frac >= 1 else ("select" if recipe.data.select else "random")
        data_info = {"n_examples": data.n_examples, "n_sequences": data.n_sequences, "total_tokens": data.total_tokens,
                     "sequences_used": used, "fraction": round(frac, 4), "policy": policy,
                     "reason": "the budget covers all the data" if frac >= 1 else
                     f"the budget covers {frac:.1%} of the sequences; "
                     + ("select the most useful subset (data.select)" if policy == "select" else "random subset")}
    return steps, data_info


def _budget_example(kind: str, unit: str) -> str:
    v = float(unit.split()[0]) * 100
    return {"flops": f"{v:.2g}", "gpu_hours": f"{v:.3g}h", "tokens": f"'{v:.3g} tokens'"}[kind]


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
           + (f"in {math.ceil(total / GiB)} GiB of CPU memory (planning for GPUs instead: set resources.gpus_per_node, "
              f"resources.accelerator and resources.gpu_memory)" if spec.on_cpu else
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
    return PlanError(" ".join(msg))


def _more_gpus(recipe, spec, shape, seq_len: int) -> int | None:
    from dataclasses import replace

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


def make_plan(recipe, spec=None, model_config=None, data_stats: DataStats | None = None,
              world_size: int | None = None) -> Plan:
    """Choose strategy, batch shape and length for `recipe` on `spec`. Raises PlanError when nothing fits."""
    from unitrain.resources import resolve_resources

    if spec is None:
        spec = resolve_resources(recipe.resources, world_size)
    elif world_size is not None and world_size > 1 and world_size != spec.world_size:
        raise PlanError(f"the launcher started {world_size} processes but the resource spec has "
                        f"{spec.world_size} ranks; make resources.gpus_per_node × nodes match the launcher")
    shape = model_shape(recipe.model, model_config, recipe.base_dir)
    seq_len = data_stats.seq_len if data_stats is not None else recipe.data.max_length
    dtype_key = "float32" if spec.on_cpu else "16bit"
    keys = {m: calibrate.fingerprint(spec.accelerator, shape.name, shape.total_params, m, dtype_key)
            for m in recipe.methods}
    scales = {m: calibrate.factors_for(k) for m, k in keys.items()}
    best, cands, refusals = run_search(recipe, spec, shape, seq_len, scales)
    if best is None:
        raise _infeasible(recipe, spec, shape, cands, seq_len, refusals)
    notes: list[str] = list(refusals)
    steps, data_info = _length(recipe, spec, best, data_stats, seq_len, notes)
    t = recipe.training
    G = t.global_batch_size
    st = best.strategy
    warm = math.ceil(t.warmup_ratio * steps)
    cool = math.ceil(t.cooldown_ratio * steps) if t.schedule == "wsd" else 0
    if st.kernels:
        notes.append("kernels: fused RMSNorm/RoPE/SwiGLU and a chunked linear-cross-entropy (no b·s·V logits)"
                     + ("; LoRA layers as one GEMM with the low-rank update in its epilogue (same saved tensors)"
                        if "lora" in st.kernels else ""))
    notes.append(f"usable memory = {'CPU memory − 10 %' if spec.on_cpu else 'GPU memory − max(5 %, 1 GiB)'} "
                 "(allocator variance, other processes); predicted peak includes context and fragmentation")
    notes.append(f"step time: {best.time.compute:.3g} s compute at {best.time.mfu:.0%} MFU + "
                 f"{best.time.communication:.3g} s exposed communication + {best.time.offload:.3g} s offload")
    flops_step = best.flops_per_token * G * seq_len
    plan = Plan(strategy=st, world_size=spec.world_size, seq_len=seq_len, global_batch_size=G, max_steps=steps,
                warmup_steps=warm, cooldown_steps=cool, tokens_per_step=G * seq_len,
                flops_per_token=best.flops_per_token, flops_per_step=flops_step, step_time_s=best.time.total,
                memory=best.memory.components, peak_memory=best.memory.peak,
                usable_memory=usable_memory(spec.gpu_memory, spec.on_cpu), cpu_memory_needed=best.memory.cpu_needed,
                resources=spec.to_dict(), budget=spec.to_dict()["budget"], total_flops=steps * flops_step,
                total_tokens=steps * G * seq_len,
                epochs=(steps * G / data_stats.n_sequences) if data_stats and data_stats.n_sequences else 0.0,
                data=data_info, rejected=rejected_alternatives(best, cands, recipe.methods), notes=notes,
                calibration=scales[st.method] or None, calibration_key=keys[st.method],
                predicted_allocated=best.memory.allocated_peak, peak_phase=best.memory.peak_phase,
                model={"name": shape.name, "model_type": shape.model_type, "params": shape.total_params,
                       "trainable_params": best.memory.trainable_params, "layers": shape.num_layers,
                       "hidden_size": shape.hidden_size, "vocab_size": shape.vocab_size, "source": shape.source})
    return plan
