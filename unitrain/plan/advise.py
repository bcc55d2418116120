"""`unitrain plan RECIPE --advise`: the recipe on every accelerator of the hardware table × 1-64 GPUs, before you rent.

Each row is one `make_plan`, the planner `unitrain plan` runs, on the recipe as `unitrain plan RECIPE --accelerator X
--gpus N [--nodes K]` loads it (the row's `command`); there is no second model. Counts above 8 GPUs are nodes of 8.

The training work is held fixed across rows: the recipe's training.max_steps, its token budget, or its epochs
over the scanned data. A FLOP or GPU-hour budget would buy different tokens on each machine, so it is first
turned into tokens on the reference hardware (what `unitrain plan` resolves for the recipe and options, or
1 × DEFAULT_ACCELERATOR where that is this CPU), and every row trains those tokens (`--budget 'T tokens'`).

Per row: fits or why not, the chosen strategy, step time, wall time = steps × step time (as `unitrain plan`
prints it), GPU-hours = wall × GPUs, cost = GPU-hours × the table's price per GPU-hour. Marked: the cheapest row
that meets the deadline (without a deadline: the cheapest) and the fastest.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from unitrain.errors import UnitrainError

COUNTS = (1, 2, 4, 8, 16, 32, 64)
GPUS_PER_NODE = 8  # a count above 8 is whole nodes of 8 GPUs
GiB = 1024**3


@dataclass
class Row:
    accelerator: str
    gpus: int
    gpus_per_node: int
    nodes: int
    fits: bool
    why_not: str = ""
    strategy: str = ""
    method: str = ""
    zero_stage: int = 0
    micro_batch_size: int = 0
    grad_accum: int = 0
    peak_gib: Optional[float] = None
    step_time_s: Optional[float] = None
    steps: int = 0
    tokens: float = 0.0
    wall_h: Optional[float] = None
    gpu_hours: Optional[float] = None
    price_per_gpu_hour: Optional[float] = None
    cost: Optional[float] = None
    meets_deadline: Optional[bool] = None
    marks: list = field(default_factory=list)  # "cheapest" (meeting the deadline), "fastest"
    command: str = ""  # the `unitrain plan` command whose plan this row is


@dataclass
class Advice:
    recipe: str
    reference: str  # the hardware a FLOP or GPU-hour budget was turned into tokens on
    work: str  # how the training work was held fixed
    deadline_h: Optional[float]
    hardware: str  # the hardware table's source
    rows: list
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def parse_hours(value: str) -> float:
    """'12h', '90m', '2d', '1.5 hours' -> hours."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(h|hr|hrs|hours?|m|min|mins|minutes?|d|days?)\s*", str(value).lower())
    if not m or float(m.group(1)) <= 0:
        raise UnitrainError(f"--deadline {value!r}: give a duration such as 12h, 90m or 2d",
                            fix="give a duration such as --deadline 12h, 90m or 2d")
    n, unit = float(m.group(1)), m.group(2)[0]
    return n / 60 if unit == "m" else n * 24 if unit == "d" else n


def short_strategy(ex) -> str:
    """'lora ZeRO-3 ckpt 2 2×4': method, engine (none on one GPU), non-default optimizer, offload, checkpointing,
    micro-batch × accumulation."""
    parts = [ex.method]
    if ex.zero_stage:
        parts.append(f"ZeRO-{ex.zero_stage}")
    elif ex.world_size > 1:
        parts.append("DDP")
    if ex.optimizer != "adamw":
        parts.append(ex.optimizer)
    if ex.offload_optimizer:
        parts.append("opt→CPU")
    if ex.offload_params:
        parts.append("params→CPU")
    if ex.checkpointing != "off":
        parts.append(f"ckpt {ex.checkpointing}")
    return " ".join(parts + [f"{ex.micro_batch_size}×{ex.grad_accum}"])


def _layout(n: int) -> tuple[int, int]:
    return (n, 1) if n <= GPUS_PER_NODE else (GPUS_PER_NODE, math.ceil(n / GPUS_PER_NODE))


def _fixed_work(base, load, stats, ref_args: list[str], ref_name: str) -> tuple[list[str], str]:
    """(CLI options every row adds, the sentence that says how the work is held fixed)."""
    from unitrain.plan import make_plan
    from unitrain.resources import parse_budget

    t = base.training
    G, seq = t.global_batch_size, base.data.max_length
    budget = parse_budget(base.resources.budget) if base.resources.budget else None
    if t.max_steps:
        return [], f"training.max_steps = {t.max_steps} steps of {G} sequences on every row"
    if budget is None:
        if stats is None:
            return [], ("the recipe sets no length (no budget, no training.max_steps) and the data is not scanned: "
                        "step times only (add --scan-data for its epochs, or --budget)")
        return [], f"training.epochs = {t.epochs or 1:g} over the scanned data on every row"
    if budget.kind == "tokens":
        return [], f"the recipe's budget of {budget} on every row"
    try:
        ref = make_plan(load(_to_overrides(ref_args)), data_stats=stats)
    except UnitrainError as e:
        raise UnitrainError(f"--advise turns the {budget} budget into tokens on the reference {ref_name}, where it "
                            f"does not plan: {e.summary}. Name a reference that fits with --accelerator/--gpus, or "
                            f"give a token budget (--budget '50M tokens')",
                            fix="name a reference that fits with --accelerator/--gpus, or give --budget 'N tokens'") \
            from None
    tokens = ref.length.steps * ref.length.tokens_per_step
    value = f"{tokens:.17g} tokens"
    return (["--budget", value],
            f"the recipe's {budget} buy {ref.length.steps} steps = {tokens:,.0f} tokens on the reference {ref_name}; "
            f"every row trains those tokens (--budget '{value}')")


def _to_overrides(args: list[str]) -> list[str]:
    """The resource options a row adds, as the recipe overrides `unitrain plan` turns them into."""
    keys = {"--accelerator": "resources.accelerator", "--gpus": "resources.gpus_per_node", "--nodes": "resources.nodes",
            "--gpu-memory": "resources.gpu_memory", "--cpu-memory": "resources.cpu_memory",
            "--budget": "resources.budget"}
    out, i = [], 0
    while i < len(args):
        if args[i] in keys:
            out.append(f"{keys[args[i]]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def advise(recipe_path: str, load: Callable, base_args: list[str], stats=None, deadline_h: float | None = None,
           counts=COUNTS) -> Advice:
    """Rows for every priced accelerator of the recipe's hardware table × `counts` GPUs.

    `load(overrides)` loads the recipe as `unitrain plan` does with the user's options plus `overrides`;
    `base_args` are the user's command-line arguments each row's command keeps (overrides, --prices, --scan-data)."""
    from unitrain.hardware import DEFAULT_ACCELERATOR, load_table
    from unitrain.plan import make_plan
    from unitrain.resources import resolve_resources

    base = load([])
    table = load_table(base.resources.hardware)
    spec = resolve_resources(base.resources)
    if spec.on_cpu:
        ref_args, ref_name = ["--accelerator", DEFAULT_ACCELERATOR, "--gpus", "1"], \
            f"1 × {DEFAULT_ACCELERATOR} (the default: the recipe names no GPU and this machine has none)"
    else:
        ref_args, ref_name = [], f"{spec.world_size} × {spec.accelerator} ({spec.gpu_memory / GiB:.0f} GiB)"
    work_args, work = _fixed_work(base, load, stats, ref_args, ref_name)
    resets = []  # the recipe's own hardware keys give way to each row's accelerator
    if base.resources.gpu_memory not in (None, "auto"):
        resets += ["--gpu-memory", "auto"]
    if base.resources.cpu_memory not in (None, "auto"):
        resets += ["--cpu-memory", "auto"]
    if base.resources.peak_tflops is not None:
        resets += ["resources.peak_tflops=null"]
    if "--budget" in work_args and "--budget" in base_args:  # the user's budget is now the tokens it buys
        i = base_args.index("--budget")
        base_args = base_args[:i] + base_args[i + 2:]
    priced = [n for n in table.listed if table.accelerators[n].price is not None]
    rows = []
    for name in priced:
        acc = table.accelerators[name]
        for n in counts:
            g, k = _layout(n)
            args = ["--accelerator", name, "--gpus", str(g)] + (["--nodes", str(k)] if k > 1 else []) + resets + work_args
            row = Row(name, n, g, k, False, price_per_gpu_hour=acc.price,
                      command="unitrain plan " + shlex.join([recipe_path] + base_args + args))
            try:
                plan = make_plan(load(_to_overrides(args)), data_stats=stats)
            except UnitrainError as e:
                row.why_not = e.summary
                rows.append(row)
                continue
            ex, L = plan.execution, plan.length
            row.fits, row.strategy, row.method, row.zero_stage = True, short_strategy(ex), ex.method, ex.zero_stage
            row.micro_batch_size, row.grad_accum = ex.micro_batch_size, ex.grad_accum
            row.peak_gib = round(plan.memory.peak / GiB, 2)
            row.step_time_s, row.steps = plan.compute.step_time_s, L.steps
            row.tokens = L.steps * L.tokens_per_step
            if L.steps:
                row.wall_h = L.steps * plan.compute.step_time_s / 3600
                row.gpu_hours = row.wall_h * plan.world_size
                row.cost = row.gpu_hours * acc.price
                row.meets_deadline = None if deadline_h is None else row.wall_h <= deadline_h
            rows.append(row)
    notes = _mark(rows, deadline_h)
    unpriced = [n for n in table.listed if n not in priced]
    if unpriced:
        notes.append(f"not priced, so not shown: {', '.join(unpriced)} (give prices with --prices FILE)")
    notes.append(f"GiB: predicted peak per GPU; $/h: on-demand USD per GPU-hour from {table.source} (each with "
                 f"its source and date; replace them with --prices FILE)")
    return Advice(recipe_path, ref_name, work, deadline_h, table.source, rows, notes)


def _mark(rows: list[Row], deadline_h: float | None) -> list[str]:
    fits = [r for r in rows if r.fits]
    notes = []
    if not fits:
        return ["nothing fits on any row: see why not, or change the recipe (method.name=qlora, a shorter "
                "data.max_length)"]
    timed = [r for r in fits if r.wall_h is not None]
    fastest = min(timed or fits, key=lambda r: (r.wall_h or r.step_time_s, r.cost or 0.0))
    fastest.marks.append("fastest")
    pool = [r for r in timed if r.cost is not None and (deadline_h is None or r.wall_h <= deadline_h)]
    if pool:
        cheapest = min(pool, key=lambda r: (round(r.cost, 6), r.wall_h))
        cheapest.marks.insert(0, "cheapest")
    elif deadline_h is not None and timed:
        notes.append(f"no row meets the {deadline_h:g} h deadline; the fastest takes {fastest.wall_h:.3g} h")
    return notes


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _small(x: float | None, fmt: str = ".3g", floor: float = 0.01) -> str:
    """Numbers for a table: no scientific notation; below `floor` just '<floor'."""
    if x is None:
        return "—"
    if x < floor:
        return f"<{floor:g}"
    return f"{x:,.0f}" if x >= 1000 else format(x, fmt)


def print_advice(adv: Advice, console) -> None:
    from rich.table import Table

    console.print(f"[bold]Hardware advice[/bold] for {adv.recipe}", highlight=False)
    console.print(f"work held fixed: {adv.work}", highlight=False, markup=False)
    if adv.deadline_h is not None:
        console.print(f"deadline: {adv.deadline_h:g} h wall (* misses it; cheapest: the cheapest that meets it)",
                      highlight=False)
    from rich import box

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col, just in (("GPU", "left"), ("n", "right"), ("GiB", "right"), ("strategy / why not", "left"),
                      ("s/step", "right"), ("wall h", "right"), ("GPU-h", "right"), ("$/h", "right"),
                      ("cost $", "right"), ("", "left")):
        t.add_column(col, justify=just, overflow="fold", no_wrap=just == "right" or not col,
                     min_width=16 if col.startswith("strategy") else None)
    last = None
    for r in adv.rows:
        if last is not None and r.accelerator != last:
            t.add_section()
        last = r.accelerator
        n = f"{r.nodes}×{r.gpus_per_node}" if r.nodes > 1 else str(r.gpus)
        price = _num(r.price_per_gpu_hour, ".2f")
        if not r.fits:
            t.add_row(r.accelerator, n, "—", f"no: {r.why_not}", "", "", "", price, "", "")
            continue
        mark = " ".join(f"◀ {m}" for m in r.marks)
        t.add_row(r.accelerator, n, f"{r.peak_gib:.1f}", r.strategy, _small(r.step_time_s, floor=0.001),
                  _small(r.wall_h) + ("*" if r.meets_deadline is False else ""), _small(r.gpu_hours),
                  price, _small(r.cost, ".0f" if (r.cost or 0) >= 10 else ".2f"), mark)
    console.print(t)
    for mark, label in (("cheapest", "cheapest" + (f" within {adv.deadline_h:g} h" if adv.deadline_h else "")),
                        ("fastest", "fastest")):
        r = next((r for r in adv.rows if mark in r.marks), None)
        if r is not None:
            n = f"{r.nodes} nodes × {r.gpus_per_node}" if r.nodes > 1 else str(r.gpus)
            console.print(f"{label}: {n} × {r.accelerator}, {r.strategy}: {_small(r.wall_h)} h wall, "
                          f"{_small(r.gpu_hours)} GPU-hours, ${_small(r.cost, '.2f')}  ({r.command})",
                          highlight=False, markup=False)
    for n in adv.notes:
        console.print(f"note: {n}", highlight=False, markup=False)
