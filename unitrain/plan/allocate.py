"""Spending the budget: training length, the eval plan, the data decision and the split, in one place.

Every cost comes out of the same budget (DESIGN.md, "Spending the budget"): training steps, evals, data
selection. `spend` allocates it for one candidate strategy; the planner calls it for every feasible candidate and
keeps the one with the lowest predicted loss at the budget (plan/__init__.py, plan/quality.py).

Units (schema.py): FLOPs are charged on *slots* (forwarded positions, padding included), data is counted in
*tokens* (real, non-pad). A step forwards G sequences; the trainer trims every micro-batch to its longest
sequence, so with b sequences per micro-batch a step forwards G · E[max of b lengths] slots and trains on
G · E[length] tokens, both from the packed lengths the data scan measured (without a scan: G · seq_len).

Evals (a forward over the first m eval sequences) get at most `training.eval_budget_share` of a FLOP or GPU-hour
budget (default 3 %). With `training.eval_every: auto` the planner sizes them: 16 evals (plus the one at step 0
and the final one) of as many sequences as the share affords; if that leaves fewer than MIN_EVAL_TOKENS real
tokens per eval (too noisy to fit a curve to), 10 evals; if still too few, only a final eval of what the share
affords, and the plan says the stop rule is off (it needs a curve). Without a budget (or with a token budget,
which counts training tokens only) the eval set is the whole split (or its first `eval_max_batches` batches) and
`auto` means 16 evals over the run.

Length, in priority: `training.max_steps`; the budget less the evals and the selection; `training.epochs` over
the data. A budget-derived length is capped at MAX_EPOCHS passes over the data (Muennighoff et al. 2023:
repeating beyond ~4 epochs pays little); the rest of the budget is left unspent and the plan says so.

Data: the pool is the cleaned training set. When the planned tokens cover it (or data.select=false), every
clean example is kept and repeated as often as the length asks (`all`); when they do not, the run trains on a
subset of exactly the planned tokens: `random` (clean examples at random: the default, `data.select: auto`,
because embedding-based selection was not measured to beat a random subset: benchmarks/results/
data_selection.md) or `select` (data.select=true: the selector ranks the pool by sentence embeddings — diversity,
semantic duplicates, difficulty — and pays for them out of the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from unitrain.errors import PlanError
from unitrain.plan import quality
from unitrain.plan.schema import BudgetPlan, DataPlan, DataStats, EvalPlan, Length

MAX_EPOCHS = 4.0  # Muennighoff et al. 2023: repeated data is worth nearly as much as fresh up to ~4 epochs
SCORING_SHARE = 0.10  # selection signals (embeddings, model scores) may cost at most this share of a FLOP budget
# The default sentence encoder (all-MiniLM-L6-v2): 2 × 10.8M non-embedding parameters per token, texts cut to
# 64 word pieces; the selector embeds at most 4× the tokens it keeps (data/select.py).
ENCODER_FLOPS_PER_TOKEN = 21_589_248.0
ENCODER_MAX_TOKENS = 64
EMBED_CANDIDATE_FACTOR = 4.0
AUTO_EVALS = 16  # evals between step 0 and the end with eval_every=auto
RULE_EVALS = 10  # the fewest that still leave the stop rule its 8 fitted evals after warmup
MIN_EVAL_TOKENS = 2048  # real tokens per eval below which an eval's noise drowns a learning curve


TARGET_STEPS = 100  # global_batch_size=auto: as many sequences per step as keep about this many optimizer steps
MAX_AUTO_BATCH = 128  # ... and never more sequences than this
FIXED_AUTO_BATCH = 8  # ... when nothing says how long the run is (training.max_steps, no scan)


def choose_global_batch(recipe, spec, stats: DataStats | None, flops_per_slot: float) -> tuple[int, str]:
    """global_batch_size=auto: (sequences per step, why). Small budgets learn by optimizer steps, not by tokens per
    step, so the batch is what leaves about TARGET_STEPS steps: a power of two per rank, between one sequence per
    rank and MAX_AUTO_BATCH. `flops_per_slot`: one candidate's training cost, enough to count sequences."""
    t, budget, world = recipe.training, spec.budget, spec.world_size
    seq_len = stats.seq_len if stats is not None else recipe.data.max_length
    per_seq = (sum(stats.train_lengths) / len(stats.train_lengths)) if stats is not None and stats.train_lengths \
        else float(seq_len)
    n_seq, why = None, ""
    if t.max_steps:
        why = f"training.max_steps sets the length: the default {FIXED_AUTO_BATCH}"
    elif budget is not None and budget.kind == "flops":
        n_seq = budget.value * (1 - t.eval_budget_share) / (flops_per_slot * per_seq)
        why = f"the budget buys ≈{n_seq:,.0f} sequences of {per_seq:.0f} tokens"
    elif budget is not None and budget.kind == "gpu_hours":
        n_seq = budget.value * 3600 * spec.peak_flops * spec.mfu / (flops_per_slot * per_seq)
        why = f"the budget buys ≈{n_seq:,.0f} sequences of {per_seq:.0f} tokens at the MFU prior"
    elif budget is not None:
        n_seq = budget.value / per_seq
        why = f"the budget is ≈{n_seq:,.0f} sequences of {per_seq:.0f} tokens"
    elif stats is not None and stats.n_sequences:
        n_seq = (t.epochs or 1.0) * stats.n_sequences
        why = f"{t.epochs or 1.0:g} epochs are {n_seq:,.0f} sequences"
    else:
        why = f"no budget and no data scan: the default {FIXED_AUTO_BATCH}"
    if n_seq is None:
        G = max(world, FIXED_AUTO_BATCH - FIXED_AUTO_BATCH % world)
        return G, f"global batch {G} (auto: {why})"
    per_rank = max(1.0, n_seq / (TARGET_STEPS * world))
    G = world * 2 ** int(math.floor(math.log2(per_rank)))
    G = max(world, min(G, max(world, MAX_AUTO_BATCH - MAX_AUTO_BATCH % world)))
    return G, (f"global batch {G} sequences (auto: {why}; about {TARGET_STEPS} optimizer steps, a power of two per "
               f"rank, at most {MAX_AUTO_BATCH}; set training.global_batch_size to fix it)")


# ---------------------------------------------------------------------------------------------- slots and tokens

def expected_width(lengths, b: int, seq_len: int) -> float:
    """E[max of b lengths drawn from `lengths`]: the width of a micro-batch trimmed to its longest sequence.

    With sorted lengths l_1 ≤ ... ≤ l_n, P(max ≤ l_i) = (i/n)^b (draws with replacement: a close upper bound
    for a random permutation's consecutive b)."""
    if not len(lengths):
        return float(seq_len)
    ls = sorted(lengths)
    n = len(ls)
    return float(sum(l * ((i / n) ** b - ((i - 1) / n) ** b) for i, l in enumerate(ls, start=1)))


def step_units(stats: DataStats | None, G: int, b: int, seq_len: int) -> tuple[float, float]:
    """(slots, real tokens) one optimizer step of G sequences forwards, with micro-batches of b."""
    if stats is None or not stats.train_lengths:
        return float(G * seq_len), float(G * seq_len)
    mean = sum(stats.train_lengths) / len(stats.train_lengths)
    return G * expected_width(stats.train_lengths, b, seq_len), G * mean


def forwarded_slots(lengths, batch_size: int, n_sequences: int, world: int) -> int:
    """Slots one eval forwards over all ranks: each batch of `batch_size` of the first `n_sequences` sequences is
    trimmed to its longest, and ranks run the same number of forwards (the ones short of a batch repeat the
    first batch and discard it), exactly as train.evaluate.eval_loss runs them."""
    ls = list(lengths)[:n_sequences]
    starts = range(0, len(ls), batch_size)
    cost = [max(1, max(ls[s:s + batch_size])) * len(ls[s:s + batch_size]) for s in starts]
    if not cost:
        return 0
    rounds = -(-len(cost) // world)
    return sum(cost) + (rounds * world - len(cost)) * cost[0]


def eval_count(steps: int, every: int, initial: bool = True) -> int:
    """Evals a run of `steps` pays for: step 0 (when `initial`), every `every` steps before the end, the end."""
    if steps <= 0:
        return 1
    return int(initial) + 1 + ((steps - 1) // every if every else 0)


# ---------------------------------------------------------------------------------------------- costs

@dataclass
class Costs:
    """One step in the budget's unit, and how many budget units one FLOP of forward-only work costs."""

    step: float
    per_eval_flop: float  # budget units per eval FLOP (0: evals are not charged, a token budget)
    unit: str  # how one step's cost reads, for messages


def unit_costs(budget, flops_step: float, step_time_s: float, world: int, tokens_step: float) -> Costs:
    """Cost of one step in the budget's unit (a token budget counts training tokens only)."""
    if budget is None or budget.kind == "flops":
        return Costs(flops_step, 1.0, f"{flops_step:.3g} FLOPs")
    if budget.kind == "gpu_hours":
        per_step = step_time_s * world / 3600
        # an eval runs at the step's speed per FLOP (a forward only: no backward, no optimizer step)
        return Costs(per_step, per_step / flops_step if flops_step else 0.0, f"{per_step:.3g} GPU-hours")
    return Costs(tokens_step, 0.0, f"{tokens_step:.0f} tokens")


def _budget_example(kind: str, value: float) -> str:
    return {"flops": f"{value:.2g}", "gpu_hours": f"{value:.3g}h", "tokens": f"'{value:.3g} tokens'"}[kind]


# ---------------------------------------------------------------------------------------------- evals

@dataclass
class _EvalShape:
    sequences: int
    count: int  # planned evals (fixed with auto cadence; a function of the length otherwise)
    initial: bool
    stop_rule: bool
    why: str


def _eval_cost(stats: DataStats, m: int, micro: int, world: int, fps: float) -> float:
    return forwarded_slots(stats.eval_lengths, micro, m, world) * fps


def _largest(stats, n_all: int, micro: int, world: int, fps: float, allowance_flops: float) -> int:
    """The most eval sequences (a prefix of the split) one eval may forward within `allowance_flops`."""
    lo, hi = 0, n_all
    while lo < hi:  # the cost grows with the prefix: bisect
        mid = (lo + hi + 1) // 2
        if _eval_cost(stats, mid, micro, world, fps) <= allowance_flops:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _size_evals(recipe, stats: DataStats | None, budget, costs: Costs, micro: int, world: int,
                fps: float) -> _EvalShape:
    t = recipe.training
    if stats is None or not stats.eval_lengths:
        return _EvalShape(0, 0, False, False, "no eval split scanned" if stats is None else "no eval split")
    n_all = len(stats.eval_lengths)
    if t.eval_max_batches:
        n_all = min(n_all, t.eval_max_batches * micro * world)
    auto = t.eval_every == "auto"
    if budget is None or costs.per_eval_flop == 0:  # nothing to size against: the split as the recipe says
        return _EvalShape(n_all, AUTO_EVALS + 2 if auto else 0, True, True, f"{n_all} eval sequences"
                          + ("" if budget is None else " (a token budget counts training tokens only)"))
    allowance = t.eval_budget_share * budget.value / costs.per_eval_flop  # in FLOPs
    share = f"{t.eval_budget_share:.0%} of the budget"
    if not auto:  # the user's cadence: the eval set is sized so its evals fit the share
        steps0 = max(1, int(budget.value / costs.step))
        count = eval_count(steps0, t.eval_every)
        m = _largest(stats, n_all, micro, world, fps, allowance / count)
        enough = m > 0 and (m == n_all or sum(stats.eval_lengths[:m]) >= MIN_EVAL_TOKENS)
        why = f"evals every {t.eval_every} steps (training.eval_every) of {m} sequences each, to fit {share}"
        if m and not enough:
            why += (f"; fewer than {MIN_EVAL_TOKENS} tokens each — too noisy for a learning curve: the stop rule is "
                    f"off (they still report the eval loss)")
        return _EvalShape(m, count, True, enough, why)
    for n_mid in (AUTO_EVALS, RULE_EVALS):
        count = n_mid + 2
        m = _largest(stats, n_all, micro, world, fps, allowance / count)
        if m and (m == n_all or sum(stats.eval_lengths[:m]) >= MIN_EVAL_TOKENS):
            return _EvalShape(m, count, True, True, f"{count} evals of {m} eval sequences fit {share}")
    m = _largest(stats, n_all, micro, world, fps, allowance)
    why = (f"{share} affords evals of fewer than {MIN_EVAL_TOKENS} tokens — too noisy for a learning curve: the "
           f"stop rule is off, and " + (f"one final eval of {m} sequences measures the result" if m else
                                        "no eval fits (not even one sequence): none is run"))
    return _EvalShape(m, 1 if m else 0, False, False, why)


# ---------------------------------------------------------------------------------------------- data

def embedding_flops(stats: DataStats, subset_tokens: float) -> float:
    """What embedding the selector's candidates costs: min(pool, 4 × subset) tokens, each text cut to 64."""
    frac = min(1.0, EMBED_CANDIDATE_FACTOR * subset_tokens / max(1, stats.total_tokens))
    embedded = min(stats.total_tokens, ENCODER_MAX_TOKENS * stats.n_examples)
    return ENCODER_FLOPS_PER_TOKEN * frac * embedded


def data_decision(recipe, stats: DataStats | None, train_tokens: float, budget) -> DataPlan:
    """How much of the (cleaned) pool the run uses, how often, and how its subset is picked."""
    if stats is None:
        return DataPlan(scanned=False, train_tokens=int(train_tokens), max_epochs=MAX_EPOCHS,
                        reason="data not scanned: planned without data statistics (unitrain plan --scan-data "
                               "tokenizes and cleans the data first)")
    unique = stats.total_tokens
    scoring = SCORING_SHARE * budget.value if budget is not None and budget.kind == "flops" else None
    what = "clean" if stats.cleaned else "raw (not cleaned)"
    common = dict(scanned=True, cleaned=stats.cleaned, unique_examples=stats.n_examples, unique_tokens=unique,
                  slot_fill=round(stats.slot_fill, 6), train_tokens=int(train_tokens), max_epochs=MAX_EPOCHS,
                  scoring_max_flops=scoring)
    select = recipe.data.select
    if select is False or train_tokens >= unique:
        epochs = train_tokens / unique if unique else 0.0
        why = ("data.select=false: every example, in a shuffled order" if select is False else
               f"the planned {train_tokens:,.0f} tokens cover the {unique:,} {what} tokens: every example is kept")
        return DataPlan(subset_tokens=unique, epochs=round(epochs, 6), policy="all",
                        reason=f"{why}; {epochs:.2f} epochs", **common)
    frac = train_tokens / unique
    head = (f"the planned tokens cover {frac:.1%} of the {unique:,} {what} tokens: a subset of {train_tokens:,.0f} "
            f"tokens (one pass), ")
    if select == "auto":
        return DataPlan(subset_tokens=int(train_tokens), epochs=1.0, policy="random",
                        reason=head + "clean examples at random (data.select=auto: embedding-based selection was not "
                                      "measured to beat a random subset, so the default does not pay for it; "
                                      "data.select=true buys it)", **common)
    embed, cost, how = recipe.data.select_encoder is not None, 0.0, ""
    if embed:
        cost = embedding_flops(stats, train_tokens)
        if scoring is not None and cost > scoring:
            embed, how = False, (f"; embeddings skipped: ≈{cost:.3g} FLOPs > {SCORING_SHARE:.0%} of the budget, so "
                                 f"clean examples are taken at random")
            cost = 0.0
        else:
            how = f"; sentence embeddings for diversity and difficulty, ≈{cost:.3g} FLOPs"
    return DataPlan(subset_tokens=int(train_tokens), epochs=1.0, policy="select", embed=embed, selection_flops=cost,
                    reason=head + "ranked by the selector (data.select=true)" + how, **common)


def epoch_cap(stats: DataStats | None, G: int) -> int | None:
    """The most steps a budget-derived length may take: MAX_EPOCHS passes over the packed data."""
    if stats is None or not stats.n_sequences:
        return None
    return max(1, math.floor(MAX_EPOCHS * stats.n_sequences / G))


# ---------------------------------------------------------------------------------------------- the allocation

@dataclass
class Allocation:
    length: Length
    data: DataPlan
    evals: EvalPlan
    budget: BudgetPlan
    effective_tokens: float  # D_eff of the planned training tokens over the subset (quality.effective_tokens)
    notes: list = field(default_factory=list)


def spend(recipe, spec, micro: int, flops_per_slot: float, step_time_s: float, forward_fps: float,
          stats: DataStats | None, seq_len: int) -> Allocation:
    """Length, evals, data and the budget split for one candidate (its micro-batch, FLOPs per slot, step time)."""
    t, budget, world = recipe.training, spec.budget, spec.world_size
    G = t.global_batch_size
    slots, tokens = step_units(stats, G, micro, seq_len)
    flops_step = flops_per_slot * slots
    costs = unit_costs(budget, flops_step, step_time_s, world, tokens)
    ev = _size_evals(recipe, stats, budget, costs, micro, world, forward_fps)
    one_eval = _eval_cost(stats, ev.sequences, micro, world, forward_fps) if ev.sequences else 0.0
    notes: list[str] = []
    capped_from = None
    selection = 0.0
    if t.max_steps:
        steps, rule = t.max_steps, "max_steps"
        notes.append(f"length: training.max_steps = {steps}")
    elif budget is not None:
        def fixed_evals(n):  # auto cadence: a fixed number of evals, whatever the length
            return (ev.count if t.eval_every == "auto" else eval_count(n, t.eval_every, ev.initial) if ev.sequences
                    else 0) * one_eval * costs.per_eval_flop

        def fits(n, left):
            return n * costs.step + fixed_evals(n) <= left

        steps = _most_steps(fits, budget.value, costs.step)
        selection = data_decision(recipe, stats, steps * tokens, budget).selection_flops if budget.kind == "flops" \
            else 0.0
        if selection:  # the selector's embeddings come out of the same budget
            steps = _most_steps(fits, budget.value - selection, costs.step)
        rule = "budget"
        if steps < 1:
            evals = f" plus evals of {one_eval:.3g} FLOPs each" if one_eval else ""
            raise PlanError(f"resources.budget={budget} is too small for a single optimizer step, which costs "
                            f"{costs.unit}{evals} (global batch {G} × {seq_len} tokens); raise the budget, e.g. "
                            f"resources.budget={_budget_example(budget.kind, costs.step * 100)}, or lower "
                            f"training.global_batch_size or data.max_length")
        spent = fixed_evals(steps)
        notes.append(f"length: budget {budget}" + (f" − evals {spent:.3g} ({spent / budget.value:.1%})" if spent else "")
                     + (f" − selection {selection:.3g}" if selection else "") + f" / {costs.unit} per step = {steps} "
                     f"steps")
        cap = epoch_cap(stats, G)
        if cap is not None and steps > cap:
            capped_from, steps, rule = steps, cap, "epoch_cap"
            notes.append(f"capped at {MAX_EPOCHS:g} epochs ({cap} steps): repeating data beyond ~{MAX_EPOCHS:g} "
                         f"epochs pays little (Muennighoff et al. 2023); the rest of the budget is left unspent")
    elif stats is not None and stats.n_sequences:
        epochs = t.epochs or 1.0
        steps, rule = max(1, math.ceil(epochs * stats.n_sequences / G)), "epochs"
        notes.append(f"length: {epochs:g} epochs × {stats.n_sequences} sequences / global batch {G} = {steps} steps")
        if epochs > MAX_EPOCHS:
            notes.append(f"training.epochs={epochs:g} is above {MAX_EPOCHS:g}: returns from repeated data fall off "
                         f"(Muennighoff et al. 2023); kept because it was set explicitly")
    else:
        steps, rule = 0, "unset"
        notes.append("length: set once the data is scanned (training.epochs × sequences / global batch); no "
                     "budget and no training.max_steps given")
    if t.eval_every != "auto":
        every = t.eval_every  # the user's cadence, also when the evals are too small for the stop rule
    else:  # auto: the planned number of evals over the run, or only the final one
        every = max(1, math.ceil(steps / (ev.count - 1))) if ev.stop_rule and ev.count > 2 else 0
    count = eval_count(steps, every, ev.initial) if ev.sequences else 0
    evals = EvalPlan(sequences=ev.sequences, tokens=int(sum(stats.eval_lengths[:ev.sequences])) if stats else 0,
                     slots=forwarded_slots(stats.eval_lengths, micro, ev.sequences, world) if ev.sequences else 0,
                     batch_size=micro, every=every, count=count, flops=one_eval,
                     initial=ev.initial and bool(ev.sequences), stop_rule=ev.stop_rule, reason=ev.why)
    warm = math.ceil(t.warmup_ratio * steps)
    cool = math.ceil(t.cooldown_ratio * steps) if t.schedule == "wsd" else 0
    length = Length(steps=steps, warmup=warm, cooldown=cool, schedule=t.schedule, rule=rule, slots_per_step=slots,
                    tokens_per_step=tokens)
    data = data_decision(recipe, stats, steps * tokens, budget)
    split = _budget_plan(budget, costs, steps, count * one_eval * costs.per_eval_flop, capped_from,
                         data.selection_flops if budget is not None and budget.kind == "flops" else 0.0)
    d_eff = quality.effective_tokens(steps * tokens, data.subset_tokens) if data.scanned else steps * tokens
    return Allocation(length, data, evals, split, d_eff, notes)


def _most_steps(fits, left: float, step_cost: float) -> int:
    n = max(0, int(left / step_cost)) if step_cost > 0 else 0
    while n > 0 and not fits(n, left):
        n -= 1
    while fits(n + 1, left):
        n += 1
    return n


def _budget_plan(budget, costs: Costs, steps: int, evals: float, capped_from: int | None,
                 selection: float = 0.0) -> BudgetPlan:
    if budget is None:
        return BudgetPlan()
    train = steps * costs.step
    split = {"training": train, "evals": evals, "selection": selection, "calibration": 0.0}
    unspent, why = max(0.0, budget.value - train - evals - selection), ""
    if capped_from is not None:
        why = (f"capped at {MAX_EPOCHS:g} epochs ({steps} of the {capped_from} steps the budget buys): repeating "
               f"data beyond ~{MAX_EPOCHS:g} epochs pays little (Muennighoff et al. 2023)")
    elif unspent > costs.step:
        why = "left over after the last whole step and its evals"
    return BudgetPlan(kind=budget.kind, value=budget.value, split=split, unspent=unspent, unspent_reason=why)


def with_cadence(evals: EvalPlan, every: int, steps: int) -> EvalPlan:
    """The eval plan with another cadence (a mutable key on resume): the same eval set, the count recomputed."""
    if not evals.sequences or not evals.stop_rule:
        return evals
    return replace(evals, every=every, count=eval_count(steps, every, evals.initial))
