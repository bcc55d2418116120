"""Spending the budget: training length, the data decision and the eval plan, in one place.

Units (schema.py): FLOPs are charged on *slots* (forwarded positions, padding included), data is counted in
*tokens* (real, non-pad). A step forwards G sequences; the trainer trims every micro-batch to its longest
sequence, so with b sequences per micro-batch a step forwards G · E[max of b lengths] slots and trains on
G · E[length] tokens, both from the packed lengths the data scan measured (without a scan: G · seq_len).

Length, in priority: `training.max_steps`; the budget (FLOPs, GPU-hours or training tokens) less what the
evals cost; `training.epochs` over the data. A budget-derived length is capped at `max_epochs` passes over
the data (Muennighoff et al. 2023: repeating beyond ~4 epochs pays little); the rest of the budget is left
unspent and the plan says so.

Data: the pool is the cleaned training set (exact/near duplicates and broken examples removed before
planning). When the planned tokens cover the pool (or data.select=false), every clean example is kept and the
run reads it in a shuffled order, repeating it as often as the length asks (`all`); when they do not, the
selector ranks the pool and fills exactly the planned tokens (`select`). The selector decides no size.

Evals: the eval split (or its first `eval_max_batches` micro-batches), at step 0, every `eval_every` steps
and at the end; one eval costs its forwarded slots × the compute model's forward FLOPs per slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unitrain.errors import PlanError
from unitrain.plan.schema import BudgetPlan, DataPlan, DataStats, EvalPlan

MAX_EPOCHS = 4.0  # Muennighoff et al. 2023: repeated data is worth nearly as much as fresh up to ~4 epochs
SCORING_SHARE = 0.10  # selection signals (embeddings, model scores) may cost at most this share of a FLOP budget
# The default sentence encoder (all-MiniLM-L6-v2): 2 × 10.8M non-embedding parameters per token, texts cut to
# 64 word pieces; the selector embeds at most 4× the tokens it keeps (data/select.py).
ENCODER_FLOPS_PER_TOKEN = 21_589_248.0
ENCODER_MAX_TOKENS = 64
EMBED_CANDIDATE_FACTOR = 4.0


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


def eval_count(steps: int, every: int) -> int:
    """Evals a run of `steps` pays for: step 0, every `every` steps before the end, and the end."""
    if steps <= 0:
        return 1
    return 2 + ((steps - 1) // every if every else 0)


# ---------------------------------------------------------------------------------------------- the parts

@dataclass
class Costs:
    """One step and one eval in the budget's unit."""

    step: float
    eval: float
    unit: str  # how one step's cost reads, for messages


def eval_plan(stats: DataStats | None, recipe, micro: int, world: int, forward_fps: float) -> EvalPlan:
    t = recipe.training
    if stats is None or not stats.eval_lengths:
        return EvalPlan(every=t.eval_every, batch_size=micro,
                        reason="no eval split scanned" if stats is None else "no eval split")
    n = len(stats.eval_lengths)
    if t.eval_max_batches:
        n = min(n, t.eval_max_batches * micro * world)
    slots = forwarded_slots(stats.eval_lengths, micro, n, world)
    return EvalPlan(sequences=n, tokens=int(sum(stats.eval_lengths[:n])), slots=slots, batch_size=micro,
                    every=t.eval_every, flops=slots * forward_fps,
                    reason=f"{n} eval sequences in batches of {micro}" +
                           (f" (training.eval_max_batches={t.eval_max_batches})" if t.eval_max_batches else ""))


def unit_costs(budget, flops_step: float, step_time_s: float, world: int, tokens_step: float,
               eval_flops: float) -> Costs:
    """Cost of one step and one eval in the budget's unit (a token budget counts training tokens only)."""
    if budget is None or budget.kind == "flops":
        return Costs(flops_step, eval_flops, f"{flops_step:.3g} FLOPs")
    if budget.kind == "gpu_hours":
        per_step = step_time_s * world / 3600
        # an eval runs at the step's speed per FLOP (a forward only: no backward, no optimizer step)
        return Costs(per_step, per_step * eval_flops / flops_step if flops_step else 0.0,
                     f"{per_step:.3g} GPU-hours")
    return Costs(tokens_step, 0.0, f"{tokens_step:.0f} tokens")


def length_from_budget(budget, costs: Costs, every: int, G: int, seq_len: int) -> tuple[int, str]:
    """The most steps whose training and evals fit the budget. Raises PlanError when not one does."""
    def cost(n: int) -> float:
        return n * costs.step + eval_count(n, every) * costs.eval

    per = costs.step + (costs.eval / every if every else 0.0)
    steps = max(0, int((budget.value - 2 * costs.eval) / per)) if per > 0 else 0
    while steps > 0 and cost(steps) > budget.value:
        steps -= 1
    while cost(steps + 1) <= budget.value:
        steps += 1
    if steps < 1:
        evals = f" plus two evals of {costs.eval:.3g} each" if costs.eval else ""
        raise PlanError(f"resources.budget={budget} is too small for a single optimizer step, which costs "
                        f"{costs.unit}{evals} (global batch {G} × {seq_len} tokens); raise the budget, e.g. "
                        f"resources.budget={_budget_example(budget.kind, costs.step * 100)}, or lower "
                        f"training.global_batch_size or data.max_length")
    if costs.eval:
        spent = cost(steps) - steps * costs.step
        note = (f"length: budget {budget} − evals {spent:.3g} ({spent / budget.value:.1%}; a forward only) / "
                f"{costs.unit} per step = {steps} steps")
    else:
        note = f"length: budget {budget} / {costs.unit} per step = {steps} steps"
    return steps, note


def _budget_example(kind: str, value: float) -> str:
    return {"flops": f"{value:.2g}", "gpu_hours": f"{value:.3g}h", "tokens": f"'{value:.3g} tokens'"}[kind]


def embedding_flops(stats: DataStats, subset_tokens: float) -> float:
    """What embedding the selector's candidates costs: min(pool, 4 × subset) tokens, each text cut to 64."""
    frac = min(1.0, EMBED_CANDIDATE_FACTOR * subset_tokens / max(1, stats.total_tokens))
    embedded = min(stats.total_tokens, ENCODER_MAX_TOKENS * stats.n_examples)
    return ENCODER_FLOPS_PER_TOKEN * frac * embedded


def data_decision(recipe, stats: DataStats | None, train_tokens: float, budget) -> DataPlan:
    """How much of the (cleaned) pool the run uses, how often, and how the selector picks it."""
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
    if not recipe.data.select or train_tokens >= unique:
        epochs = train_tokens / unique if unique else 0.0
        why = ("data.select=false: every example, in a shuffled order" if not recipe.data.select else
               f"the planned {train_tokens:,.0f} tokens cover the {unique:,} {what} tokens: every example is kept")
        return DataPlan(subset_tokens=unique, epochs=round(epochs, 6), policy="all",
                        reason=f"{why}; {epochs:.2f} epochs", **common)
    frac = train_tokens / unique
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
                    reason=f"the planned tokens cover {frac:.1%} of the {unique:,} {what} tokens: the selector "
                           f"ranks the pool and fills {train_tokens:,.0f} tokens (one pass){how}", **common)


def epoch_cap(stats: DataStats | None, G: int) -> int | None:
    """The most steps a budget-derived length may take: MAX_EPOCHS passes over the packed data."""
    if stats is None or not stats.n_sequences:
        return None
    return max(1, math.floor(MAX_EPOCHS * stats.n_sequences / G))


def budget_plan(budget, costs: Costs, steps: int, evals: int, capped_from: int | None,
                selection: float = 0.0) -> BudgetPlan:
    if budget is None:
        return BudgetPlan()
    train, ev = steps * costs.step, evals * costs.eval
    split = {"training": train, "evals": ev, "selection": selection, "calibration": 0.0}
    unspent, why = max(0.0, budget.value - train - ev - selection), ""
    if capped_from is not None:
        why = (f"capped at {MAX_EPOCHS:g} epochs ({steps} of the {capped_from} steps the budget buys): repeating "
               f"data beyond ~{MAX_EPOCHS:g} epochs pays little (Muennighoff et al. 2023)")
    elif unspent > costs.step:
        why = "left over after the last whole step and its evals"
    return BudgetPlan(kind=budget.kind, value=budget.value, split=split, unspent=unspent, unspent_reason=why)
