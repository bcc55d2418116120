"""Before a run executes a plan it did not just make (a plan file, a relaunch's stored plan.json): is it this
recipe's plan, was it made for this machine, and does this machine have the packages it needs?

A plan file is made anywhere (`unitrain plan ... --scan-data --out plan.json`, e.g. on a laptop for the cluster)
and executed exactly: so the machine the run finds must be the one planned — the same world size, the same
accelerator, at least the planned memory per GPU (a device may report up to 3 % under its datasheet) — and the
packages the plan's strategy uses (DeepSpeed for ZeRO, bitsandbytes for 8-bit optimizers and QLoRA, Triton for the
fused kernels) must be installed here. Each check lists every mismatch at once; `--replan` plans for this
machine instead.
"""

from __future__ import annotations

from unitrain.errors import MissingPackageError, UnitrainError
from unitrain.resources import MEMORY_TOLERANCE, installed_packages

GiB = 1024**3
EXTRAS = {"deepspeed": "deepspeed", "bitsandbytes": "bnb", "triton": "triton"}  # pyproject extras


def needed_packages(plan) -> dict[str, str]:
    """{package: what in the plan needs it}."""
    ex, need = plan.execution, {}
    if ex.zero_stage > 0:
        need["deepspeed"] = f"DeepSpeed ZeRO-{ex.zero_stage}" + (" with CPU offload" if ex.offload_optimizer else "")
    if ex.optimizer != "adamw":
        need["bitsandbytes"] = f"the {ex.optimizer} optimizer"
    if ex.method == "qlora":
        need["bitsandbytes"] = "QLoRA's 4-bit NF4 base weights" + (f" and {need['bitsandbytes']}"
                                                                   if "bitsandbytes" in need else "")
    if ex.kernels:
        need["triton"] = f"the fused kernels ({'+'.join(ex.kernels)})"
    return need


def check_packages(plan, installed: list[str] | None = None) -> None:
    """Refuse a plan that needs a package this machine lacks, naming it and the install command."""
    have = installed_packages() if installed is None else installed
    missing = {p: why for p, why in needed_packages(plan).items() if p not in have}
    if not missing:
        return
    if len(missing) == 1:
        (pkg, why), = missing.items()
        raise MissingPackageError(pkg, f"this plan ({why})", EXTRAS.get(pkg))
    cmd = "pip install " + " ".join(f"'unitrain[{EXTRAS[p]}]'" for p in missing)
    raise UnitrainError(f"this plan needs packages this machine does not have: "
                        + "; ".join(f"{p} for {why}" for p, why in missing.items())
                        + f". Install them with: {cmd} (or plan for what is here with --replan)",
                        fix=f"install them with: {cmd}", summary=f"needs {', '.join(missing)} (not installed)")


def machine_mismatches(plan, found) -> list[str]:
    """What the machine found (a ResourceSpec) differs in from what `plan` was made for."""
    r, out = plan.resources, []
    if r.on_cpu != found.on_cpu:
        out.append(f"device: planned for {'CPU processes' if r.on_cpu else f'{r.accelerator} GPUs'}, found "
                   f"{'no CUDA GPU (CPU)' if found.on_cpu else f'{found.accelerator} GPUs'}")
    elif not r.on_cpu and r.accelerator != found.accelerator:
        out.append(f"accelerator: planned {r.accelerator}, found {found.accelerator}")
    if plan.world_size != found.world_size:
        out.append(f"world size: planned {plan.world_size} ({r.nodes} node(s) × {max(1, r.gpus_per_node)}), found "
                   f"{found.world_size} ({found.nodes} node(s) × {max(1, found.gpus_per_node)})")
    if found.gpu_memory < r.gpu_memory * (1 - MEMORY_TOLERANCE):
        unit = "process" if r.on_cpu else "GPU"
        out.append(f"memory per {unit}: planned {r.gpu_memory / GiB:.1f} GiB, found {found.gpu_memory / GiB:.1f} GiB")
    return out


def machine_resources(world_size: int | None = None, nodes: int = 1, cpu: bool = False):
    """What this machine offers a run, whatever a recipe asks: the spec a plan it did not make is checked against.
    `cpu`: as CPU processes (any machine can run a CPU plan)."""
    from unitrain.recipe import ResourcesConfig
    from unitrain.resources import resolve_resources

    cfg = ResourcesConfig(nodes=nodes, accelerator="CPU" if cpu else "auto")
    return resolve_resources(cfg, world_size, mode="run")


def check_machine(plan, found, source: str) -> None:
    bad = machine_mismatches(plan, found)
    if bad:
        lines = "\n".join(f"  - {b}" for b in bad)
        raise UnitrainError(
            f"{source} was made for another machine:\n{lines}\nRun it where it was planned for, make a plan for this "
            f"machine (unitrain plan RECIPE --gpus {max(1, found.gpus_per_node)} --accelerator {found.accelerator} "
            f"--scan-data --out plan.json), or plan here instead with --replan",
            fix="run it on the machine it was planned for, or plan for this one with --replan",
            summary="; ".join(bad))


def recipe_mismatches(plan, recipe, shape, seq_len: int) -> list[str]:
    """What `recipe` (its model's shape, its sequence length) differs in from the recipe `plan` was made for."""
    m, ex, out = plan.model, plan.execution, []
    if (m.name, m.params) != (shape.name, shape.total_params):
        out.append(f"model: the plan is for {m.name} ({m.params:,} parameters), the recipe gives {shape.name} "
                   f"({shape.total_params:,})")
    if ex.method not in recipe.methods:
        out.append(f"method: the plan trains {ex.method}, the recipe asks for {' or '.join(recipe.methods)}")
    if plan.global_batch_size != recipe.training.global_batch_size:
        out.append(f"training.global_batch_size: the plan has {plan.global_batch_size}, the recipe "
                   f"{recipe.training.global_batch_size}")
    if plan.seq_len != seq_len:
        out.append(f"sequence length: the plan has {plan.seq_len}, the recipe {seq_len} (data.max_length)")
    return out


def load_plan_file(path, recipe, shape, stats):
    """The plan in `path`, after checking it is this recipe's and holds the data decision (DataStats `stats`)."""
    from unitrain.plan.schema import Plan
    from unitrain.train.resume import check_data

    plan = Plan.load(path)
    if not plan.data.scanned:
        raise UnitrainError(f"plan file {path} was made without the data (no --scan-data), so its subset, epochs and "
                            f"evals are undecided; make it with unitrain plan RECIPE ... --scan-data --out {path}, or "
                            f"plan here with --replan", fix=f"make it with unitrain plan ... --scan-data --out {path}")
    bad = recipe_mismatches(plan, recipe, shape, stats.seq_len)
    if bad:
        lines = "\n".join(f"  - {b}" for b in bad)
        raise UnitrainError(f"plan file {path} was made for another recipe:\n{lines}\nRun it with the recipe it was "
                            f"made for, make a new plan file for this one (unitrain plan RECIPE ... --scan-data --out "
                            f"{path}), or plan here with --replan",
                            fix="run it with the recipe it was made for, or make a new plan file",
                            summary="; ".join(bad))
    check_data(plan, stats)
    return plan
