"""A relaunch executes the run's stored plan; what may change between launches, and what may not.

Keys that do not change the math of training may change on resume (`MUTABLE`: checkpoint cadence, how many
checkpoints to keep, eval cadence, logging, tracking, exact-match scoring, where and how to resume); any
other change is refused with the list of changed keys and the two ways on: restore them, or start a new run.
The stored plan.json is executed as it is, except for the mutable parts it holds (the eval cadence).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from unitrain.errors import UnitrainError

LENGTH = ("training.max_steps", "training.epochs", "resources.budget")  # what --extend may change
MUTABLE = ("output.save_every", "output.keep_last", "output.resume", "output.overwrite", "training.eval_every",
           "training.log_every", "training.exact_match_examples", "training.exact_match_max_new_tokens",
           "tracking.", "base_dir")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not (prefix + k).startswith("model.config"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed_keys(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (stored, now)} for every recipe key that differs and is not mutable."""
    a, b = _flat(old), _flat(new)
    out = {}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k) and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MUTABLE):
            out[k] = (a.get(k), b.get(k))
    return out


def stored_plan(run_dir: Path, recipe, extend: bool = False):
    """The plan a relaunch executes: run_dir/plan.json, after checking the recipe did not change its math
    (`extend`: the length keys may change — the caller then plans the longer run)."""
    from unitrain.plan.schema import Plan

    plan_file, recipe_file = run_dir / "plan.json", run_dir / "recipe.yaml"
    missing = [f.name for f in (plan_file, recipe_file) if not f.exists()]
    if missing:
        raise UnitrainError(f"{run_dir} holds checkpoints but no {' or '.join(missing)}: it was not written by this "
                            f"unitrain. Start a new run with name=<new name>, or re-plan on top of it with --replan")
    old = OmegaConf.to_container(OmegaConf.load(recipe_file), resolve=True)
    diff = changed_keys(old, recipe.to_dict())
    if extend:
        diff = {k: v for k, v in diff.items() if k not in LENGTH}
    if diff:
        lines = "\n".join(f"  - {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UnitrainError(
            f"the recipe changed since {run_dir} was started, in keys that change what is trained:\n{lines}\n"
            f"Either restore them to continue this run (resume), or start a new run with name=<new name>"
            f"{'' if extend else ' (to train a finished run longer, change only ' + ', '.join(LENGTH) + ' and add --extend)'}. "
            f"Keys that may change on resume: {', '.join(m.rstrip('.') + ('.*' if m.endswith('.') else '') for m in MUTABLE)}")
    plan = Plan.load(plan_file)
    t = recipe.training
    if t.eval_every != "auto" and t.eval_every != plan.evals.every:  # a mutable key the plan holds
        from unitrain.plan.allocate import with_cadence

        plan = replace(plan, evals=with_cadence(plan.evals, t.eval_every, plan.length.steps))
    return plan


def check_extension(stored, plan, pre: tuple[int, Path] | None, run_dir: Path):
    """An extension keeps everything but the length, and continues from the pre-cooldown checkpoint: -> the plan
    with a note that says so."""
    if pre is None:
        raise UnitrainError(f"--extend: {run_dir / 'checkpoints'} holds no pre-cooldown checkpoint (it is written "
                            f"when the LR cooldown begins; output.keep_pre_cooldown was off, or the run never reached "
                            f"its cooldown). Resume it as it is, or start a new run with name=<new name>")
    a, b = stored.execution, plan.execution
    same = ("method", "zero_stage", "optimizer", "micro_batch_size", "grad_accum", "world_size", "global_batch_size",
            "seq_len", "dtype")
    differ = [f"{k}: {getattr(a, k)!r} -> {getattr(b, k)!r}" for k in same if getattr(a, k) != getattr(b, k)]
    if differ:
        raise UnitrainError(f"--extend: the longer plan also changes how the step runs ({'; '.join(differ)}); an "
                            f"extension changes only the length. Pin them in the recipe (e.g. "
                            f"training.micro_batch_size), or start a new run with name=<new name>")
    step, path = pre
    if plan.length.steps <= step:
        raise UnitrainError(f"--extend: the new plan ({plan.length.steps} steps) is no longer than the step it would "
                            f"continue from ({path.name}); raise training.max_steps or resources.budget")
    return replace(plan, notes=plan.notes + [
        f"extended: continues from {path.name} (step {step}, the last checkpoint before the LR cooldown of the "
        f"previous plan of {stored.length.steps} steps) to {plan.length.steps} steps under this plan's schedule"])


def check_data(plan, stats) -> None:
    """The data on disk must be the data the stored plan was made for."""
    d = plan.data
    if d.scanned and (d.unique_examples, d.unique_tokens) != (stats.n_examples, stats.total_tokens):
        raise UnitrainError(
            f"the training data changed since this run was planned: the plan has {d.unique_examples} clean examples "
            f"({d.unique_tokens} tokens), the data now gives {stats.n_examples} ({stats.total_tokens} tokens). "
            f"Restore the data to continue, or start a new run with name=<new name>")
