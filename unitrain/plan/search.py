"""Joint search over method × ZeRO stage × offload × optimizer × checkpointing × micro-batch.

Every explicit choice in the recipe is kept; `auto` fields are enumerated. A candidate is feasible when its
predicted peak fits the usable memory per GPU and its offloaded states fit the CPU memory.

Choice among feasible candidates (tie-breaks in this order):
1. method in the recipe's list order: `method.name: [full, lora, qlora]` reads "full if it fits, else ...";
2. most tokens trained within the budget (FLOP budgets count recomputation; GPU-hour budgets favour speed;
   token budgets and no budget tie here);
3. highest throughput (tokens/s);
4. simplest: lower ZeRO stage, no offload, plain AdamW before 8-bit before paged, less checkpointing;
5. smallest predicted peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from unitrain.errors import MissingPackageError, PlanError
from unitrain.plan import compute
from unitrain.plan.memory import GiB, LoraSpec, MemoryEstimate, estimate_memory
from unitrain.plan.schema import Execution
from unitrain.plan.shape import ModelShape

SAFETY_MARGIN = 0.05  # usable = memory − max(5 %, 1 GiB) on GPUs: allocator variance, other processes
CPU_SAFETY = 0.10  # usable = memory − 10 % on the host (OS, page cache, data loading)
KERNELS = ["rmsnorm", "rope", "swiglu", "fused_ce", "lora"]  # lora: LoRA plans only (QLoRA's base is 4-bit)
OPTIMIZERS = ["adamw", "adamw8bit", "paged_adamw8bit"]
CKPT_ORDER = {"off": 0, 4: 1, 2: 2, "full": 3}


def usable_memory(memory: int, on_cpu: bool) -> int:
    if on_cpu:
        return int(memory * (1 - CPU_SAFETY))
    return int(memory - max(SAFETY_MARGIN * memory, 1 * GiB))


@dataclass
class Candidate:
    strategy: Execution
    memory: MemoryEstimate
    flops_per_token: float
    time: compute.StepTime
    tokens_per_s: float
    budget_tokens: float  # tokens this candidate trains within the budget (inf without a budget)
    feasible: bool
    reason: str = ""

    def family(self) -> tuple:
        s = self.strategy
        return s.method, s.zero_stage, s.offload_optimizer, s.offload_params, s.optimizer, s.checkpointing

    def describe(self) -> str:
        s = self.strategy
        parts = [s.method, f"ZeRO-{s.zero_stage}" if s.zero_stage else "no ZeRO"]
        if s.offload_optimizer:
            parts.append("offload optimizer")
        if s.offload_params:
            parts.append("offload params")
        parts += [s.optimizer, f"checkpointing {s.checkpointing}", f"micro-batch {s.micro_batch_size}×{s.grad_accum}"]
        return ", ".join(parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _auto(v) -> bool:
    return isinstance(v, str) and v == "auto"


def dtype_for(recipe, spec) -> str:
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    if spec.on_cpu:
        return "float32"
    return "float16" if spec.accelerator in ("V100", "T4") else "bfloat16"


def kernels_for(recipe, spec, shape: ModelShape) -> list[str]:
    k = recipe.training.kernels
    if k == "off" or not shape.llama_like:
        return []
    if k == "on" and not spec.has("triton"):
        raise MissingPackageError("triton", "training.kernels=on (the fused Triton kernels)", "triton")
    if spec.on_cpu:
        return list(KERNELS) if k == "on" else []
    return list(KERNELS) if k == "on" or spec.has("triton") else []


def enumerate_strategies(recipe, spec, shape: ModelShape, refusals: list[str]) -> list[Execution]:
    """Every combination the recipe leaves open; explicit choices that cannot work raise a UnitrainError."""
    t, sc = recipe.training, recipe.strategy
    N = spec.world_size
    G = t.global_batch_size
    if G % N:
        raise PlanError(f"training.global_batch_size={G} is not divisible by the {N} data-parallel ranks; use a "
                        f"multiple of {N}, e.g. training.global_batch_size={max(N, G - G % N)}",
                        summary=f"batch {G} not divisible by {N} ranks")
    per_rank = G // N
    # The target's packages (spec.packages: the pinned image's unless planning for this machine), not the
    # planning machine's: the planner stays pure.
    have_ds, have_bnb = spec.has("deepspeed"), spec.has("bitsandbytes")
    # ZeRO stages.
    if _auto(sc.zero_stage):
        wants_offload = sc.offload_optimizer is True or sc.offload_params is True
        stages = [0] if spec.on_cpu and not wants_offload else [0, 1, 2, 3]
        if sc.offload_params is True:
            stages = [3]
        elif sc.offload_optimizer is True:
            stages = [1, 2, 3]
        if not have_ds:
            if any(s > 0 for s in stages) and (wants_offload):
                raise MissingPackageError("deepspeed", "offloading to CPU (DeepSpeed ZeRO-Offload)", "deepspeed")
            if stages != [0]:
                refusals.append("DeepSpeed ZeRO stages skipped: deepspeed is not installed "
                                "(pip install 'unitrain[deepspeed]')")
            stages = [0]
    else:
        stages = [int(sc.zero_stage)]
        if stages[0] > 0 and not have_ds:
            raise MissingPackageError("deepspeed", f"strategy.zero_stage={stages[0]}", "deepspeed")
    if sc.offload_optimizer is True and stages == [0]:
        raise PlanError("strategy.offload_optimizer=true needs DeepSpeed ZeRO: set strategy.zero_stage to 1, 2 or 3 "
                        "(or auto)")
    if sc.offload_params is True and stages != [3]:
        raise PlanError("strategy.offload_params=true needs ZeRO-3: set strategy.zero_stage=3 (or auto)")
    # Optimizers.
    if _auto(t.optimizer):
        # Paged 8-bit Adam has the same steady state as 8-bit Adam (it only absorbs spikes): not enumerated.
        optimizers = ["adamw", "adamw8bit"] if have_bnb else ["adamw"]
        if not have_bnb:
            refusals.append("8-bit optimizers skipped: bitsandbytes is not installed (pip install 'unitrain[bnb]')")
    else:
        optimizers = [t.optimizer]
        if t.optimizer != "adamw" and not have_bnb:
            raise MissingPackageError("bitsandbytes", f"training.optimizer={t.optimizer}", "bnb")
        if t.optimizer != "adamw" and sc.offload_optimizer is True:
            raise PlanError(f"training.optimizer={t.optimizer} cannot run with strategy.offload_optimizer=true: "
                            f"ZeRO-Offload steps on the CPU with DeepSpeed's CPU Adam, and bitsandbytes 8-bit states "
                            f"live on the GPU; use training.optimizer=adamw or strategy.offload_optimizer=false")
    methods = recipe.methods
    if "qlora" in methods and not have_bnb:
        if len(methods) == 1:
            raise MissingPackageError("bitsandbytes", "method qlora (4-bit NF4 base weights)", "bnb")
        refusals.append("qlora skipped: bitsandbytes is not installed (pip install 'unitrain[bnb]')")
        methods = [m for m in methods if m != "qlora"]
    if methods == ["qlora"] and stages == [3]:
        raise PlanError("method qlora cannot be combined with ZeRO-3 parameter partitioning: the 4-bit quantized "
                        "weights (bitsandbytes Params4bit) cannot be partitioned and gathered by DeepSpeed; use "
                        "strategy.zero_stage 0-2 (or auto)")
    merge_adapter = recipe.output.merge and methods != ["full"]
    if merge_adapter and stages == [3]:
        raise PlanError("output.merge=true with LoRA/QLoRA needs the whole base model on one rank, which ZeRO-3 "
                        "partitions; use strategy.zero_stage 0-2 (or auto), or merge later with peft's "
                        "merge_and_unload on the exported adapter")
    gc = t.gradient_checkpointing
    ckpts = ["off", 4, 2, "full"] if _auto(gc) else [gc]
    ckpts = [c for c in ckpts if not isinstance(c, int) or c < shape.num_layers or not _auto(gc)]
    if isinstance(t.micro_batch_size, int):
        if per_rank % t.micro_batch_size:
            raise PlanError(f"training.micro_batch_size={t.micro_batch_size} does not divide the per-rank batch "
                            f"{per_rank} (= global_batch_size {G} / {N} ranks); use one of {_divisors(per_rank)}")
        micros = [t.micro_batch_size]
    elif isinstance(t.gradient_accumulation, int):
        if per_rank % t.gradient_accumulation:
            raise PlanError(f"training.gradient_accumulation={t.gradient_accumulation} does not divide the per-rank "
                            f"batch {per_rank}; use one of {_divisors(per_rank)}")
        micros = [per_rank // t.gradient_accumulation]
    else:
        micros = _divisors(per_rank)
    if isinstance(t.micro_batch_size, int) and isinstance(t.gradient_accumulation, int) and \
            t.micro_batch_size * t.gradient_accumulation != per_rank:
        raise PlanError(f"training.micro_batch_size × gradient_accumulation × ranks = {t.micro_batch_size} × "
                        f"{t.gradient_accumulation} × {N} ≠ global_batch_size {G}; set one of them to auto")
    dtype, kernels = dtype_for(recipe, spec), kernels_for(recipe, spec, shape)
    out = []
    for method in methods:
        for zs in stages:
            if method == "qlora" and zs == 3 or merge_adapter and method != "full" and zs == 3:
                continue
            offs_o = [False] if zs == 0 else ([sc.offload_optimizer] if isinstance(sc.offload_optimizer, bool)
                                              else [False, True])
            offs_p = [False] if zs != 3 else ([sc.offload_params] if isinstance(sc.offload_params, bool)
                                              else [False, True])
            for oo in offs_o:
                for op in offs_p:
                    if op and not oo:  # ZeRO-Infinity: parameter offload goes with optimizer offload
                        continue
                    for opt in optimizers:
                        if opt != "adamw" and oo:  # offload steps with DeepSpeed's CPU Adam, not bitsandbytes
                            continue
                        for ck in ckpts:
                            for mb in micros:
                                out.append(Execution(method=method, zero_stage=zs, offload_optimizer=oo,
                                                    offload_params=op, optimizer=opt, checkpointing=ck,
                                                    micro_batch_size=mb, grad_accum=per_rank // mb,
                                                    kernels=[k for k in kernels if k != "lora" or method == "lora"],
                                                    dtype=dtype))
    return out


def evaluate(st: Execution, shape: ModelShape, spec, seq_len: int, G: int, lora: LoraSpec,
             scale: dict | None = None) -> Candidate:
    mem = estimate_memory(shape, st, seq_len, spec.world_size, spec.gpus_per_node, spec.on_cpu, lora, scale)
    fpt = compute.flops_per_token(shape, st.method, seq_len, st.checkpointing,
                                  mem.trainable_params if st.method != "full" else 0)
    tm = compute.step_time(shape, st, seq_len, G, fpt, spec, mem.trainable_params)
    if scale and "step_time" in scale:
        tm = replace(tm, total=tm.total * scale["step_time"])
    usable = usable_memory(spec.gpu_memory, spec.on_cpu)
    cpu_usable = usable_memory(spec.cpu_memory, True)
    reason, ok = "", True
    if mem.peak > usable:
        ok, reason = False, f"peak {mem.peak / GiB:.1f} GiB > usable {usable / GiB:.1f} GiB per GPU"
    elif not spec.on_cpu and mem.cpu_needed > cpu_usable:
        ok, reason = False, (f"offload needs {mem.cpu_needed / GiB:.0f} GiB of CPU memory per node > usable "
                             f"{cpu_usable / GiB:.0f} GiB (resources.cpu_memory)")
    tps = G * seq_len / tm.total
    budget = spec.budget
    if budget is None or budget.kind == "tokens":
        bt = float("inf") if budget is None else budget.value
    elif budget.kind == "flops":
        bt = budget.value / fpt
    else:
        bt = budget.value * 3600 / spec.world_size * tps
    return Candidate(st, mem, fpt, tm, tps, bt, ok, reason)


def sort_key(c: Candidate, methods: list[str]) -> tuple:
    s = c.strategy
    return (methods.index(s.method), -c.budget_tokens, -round(c.tokens_per_s, 9), s.zero_stage, s.offload_optimizer,
            s.offload_params, OPTIMIZERS.index(s.optimizer), CKPT_ORDER.get(s.checkpointing, 1.5), c.memory.peak)


def search(recipe, spec, shape: ModelShape, seq_len: int, scales: dict | None = None):
    """(best feasible candidate or None, all candidates, refusal notes). `scales`: method -> calibration factors,
    or (method, checkpointing) -> a trace's factors for that pair, which wins."""
    refusals: list[str] = []
    lora = LoraSpec.of(recipe.method.lora)
    strategies = enumerate_strategies(recipe, spec, shape, refusals)
    G = recipe.training.global_batch_size
    sc = scales or {}
    cands = [evaluate(s, shape, spec, seq_len, G, lora, sc.get((s.method, str(s.checkpointing)), sc.get(s.method)))
             for s in strategies]
    feasible = sorted((c for c in cands if c.feasible), key=lambda c: sort_key(c, recipe.methods))
    return (feasible[0] if feasible else None), cands, refusals


def rejected_alternatives(best: Candidate, cands: list[Candidate], methods: list[str], outcomes: dict | None = None,
                          k: int = 5) -> list[dict]:
    """Why not something else: first the closest configurations that would have been better but do not fit
    (one per family: method, ZeRO, offload, checkpointing), then the best feasible runners-up — with a budget,
    ranked by their predicted outcome (`outcomes`: id -> [allocation, forward FLOPs, score], plan/__init__.py)."""
    outcomes = outcomes or {}

    def rank(c):
        return (round(outcomes[id(c)][2], 3) if id(c) in outcomes else 0.0, sort_key(c, methods))

    def family(c):
        s = c.strategy
        return s.method, s.zero_stage, s.offload_optimizer, s.offload_params, s.checkpointing

    key_best = rank(best)
    misses: dict[tuple, Candidate] = {}
    runners: dict[tuple, Candidate] = {}
    for c in cands:
        if c is best:
            continue
        if not c.feasible and sort_key(c, methods) < sort_key(best, methods):  # better on paper, does not fit
            fam = (c.strategy.method, c.strategy.checkpointing)  # "why not without recomputation?"
            cur = misses.get(fam)
            if cur is None or c.memory.peak < cur.memory.peak:
                misses[fam] = c
        elif c.feasible and family(c) != family(best):
            cur = runners.get(family(c))
            if cur is None or rank(c) < rank(cur):
                runners[family(c)] = c
    miss = sorted(misses.values(), key=lambda c: -c.tokens_per_s)[:max(2, k - 2)]
    run, ties = [], 0
    for c in sorted(runners.values(), key=rank):
        tie = c.strategy.method == best.strategy.method and c.budget_tokens >= best.budget_tokens and \
            c.tokens_per_s >= best.tokens_per_s * 0.995 and rank(c)[0] == rank(best)[0]
        if tie and ties:  # one "equally good, but less simple" example is enough
            continue
        ties += tie
        run.append(c)
    run = run[:k - len(miss)]
    for m in methods:  # every other method the recipe allows: its best alternative, with how it compares
        alt = [c for c in runners.values() if c.strategy.method == m]
        if m != best.strategy.method and alt and not any(c.strategy.method == m for c in run):
            run.append(min(alt, key=rank))
    out = []
    for c in miss + run:
        out.append({"strategy": c.describe(), "peak_gib": round(c.memory.peak / GiB, 2),
                    "tokens_per_s": round(c.tokens_per_s, 1), "feasible": c.feasible,
                    "reason": _lost_because(best, c, methods, outcomes) if c.feasible else c.reason})
    return out


def _lost_because(best: Candidate, c: Candidate, methods: list[str], outcomes: dict) -> str:
    if id(c) in outcomes and id(best) in outcomes:  # a budget: the predicted outcome decided
        a, b = outcomes[id(best)], outcomes[id(c)]
        if round(b[2], 3) > round(a[2], 3):
            if a[2] >= 0:  # scores are predicted losses (measured curves)
                return f"fits, but predicted {b[2] - a[2]:+.4f} higher loss at the budget ({b[2]:.4f} vs {a[2]:.4f})"
            ratio = b[0].effective_tokens / max(1.0, a[0].effective_tokens)
            return (f"fits, but trains {1 - ratio:.0%} fewer effective tokens within the budget ({b[0].effective_tokens:,.0f}"
                    f" vs {a[0].effective_tokens:,.0f}): a higher predicted loss on any falling curve")
    if methods.index(c.strategy.method) > methods.index(best.strategy.method):
        return f"fits, but the recipe lists {best.strategy.method} before {c.strategy.method}"
    if c.budget_tokens < best.budget_tokens * 0.995:
        ratio = best.budget_tokens / c.budget_tokens
        return (f"fits, but trains {(1 - 1 / ratio) * 100:.0f} % fewer tokens within the budget" if ratio < 1.5 else
                f"fits, but trains {ratio:.1f}× fewer tokens within the budget")
    if c.tokens_per_s < best.tokens_per_s * 0.995:
        ratio = best.tokens_per_s / c.tokens_per_s
        return f"fits, but {(ratio - 1) * 100:.0f} % slower" if ratio < 1.5 else f"fits, but {ratio:.1f}× slower"
    return "fits, equally fast; the chosen one is simpler or smaller"
