"""Show a Plan: a rich table with the memory breakdown as bars, compute, length, rejected alternatives.

`plan_summary_lines` gives the same facts as plain text lines (logs, run reports, tests).
"""

from __future__ import annotations

from unitrain.plan.schema import Plan

GiB = 1024**3
BAR = 28


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _num(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _strategy_line(plan: Plan) -> str:
    s = plan.strategy
    parts = [s.method, f"ZeRO-{s.zero_stage}" if s.zero_stage else ("DDP" if plan.world_size > 1 else "no ZeRO")]
    if s.offload_optimizer:
        parts.append("optimizer→CPU")
    if s.offload_params:
        parts.append("params→CPU")
    parts += [s.optimizer, f"checkpointing {s.checkpointing}", s.dtype]
    if s.kernels:
        parts.append("kernels " + "+".join(s.kernels))
    return " · ".join(parts)


def _device(plan: Plan) -> str:
    r = plan.resources or {}
    if r.get("gpus_per_node") == 0:
        return f"CPU ({r.get('gpu_memory', 0) / GiB:.0f} GiB)"
    nodes = r.get("nodes", 1)
    return (f"{str(nodes) + ' nodes × ' if nodes > 1 else ''}{r.get('gpus_per_node')} × {r.get('accelerator')} "
            f"({r.get('gpu_memory', 0) / GiB:.0f} GiB each, CPU {r.get('cpu_memory', 0) / GiB:.0f} GiB per node)")


def _length_lines(plan: Plan) -> list[str]:
    gpus = max(1, plan.world_size)
    hours = plan.max_steps * plan.step_time_s / 3600
    budget = plan.budget
    b = "none" if not budget else f"{budget['value']:.3g} {budget['kind'].replace('_', '-')}"
    lines = [f"length: {plan.max_steps} steps (warmup {plan.warmup_steps}, cooldown {plan.cooldown_steps}), "
             f"{_num(plan.total_tokens)} tokens, {plan.total_flops:.3g} FLOPs, {hours:.3g} h wall = "
             f"{hours * gpus:.3g} GPU-hours; budget {b}"]
    if plan.epochs:
        lines.append(f"data: {plan.epochs:.2f} epochs; {plan.data.get('reason', '')}".rstrip("; "))
    return lines


def plan_summary_lines(plan: Plan) -> list[str]:
    """The plan in plain text lines: strategy, batch, memory per component, compute, length, rejections."""
    s, m = plan.strategy, plan.model or {}
    lines = [f"plan: {_strategy_line(plan)}",
             f"model: {m.get('name', '?')} ({_num(m.get('params', 0))} params, {_num(m.get('trainable_params', 0))} "
             f"trainable; shape from {m.get('source', '?')})",
             f"resources: {_device(plan)}",
             f"batch: {s.micro_batch_size} micro × {s.grad_accum} accumulation × {plan.world_size} ranks = "
             f"{plan.global_batch_size} sequences × {plan.seq_len} tokens = {plan.tokens_per_step} tokens/step",
             f"memory per {'process' if (plan.resources or {}).get('gpus_per_node') == 0 else 'GPU'}: peak "
             f"{_gib(plan.peak_memory)} GiB of {_gib(plan.usable_memory)} GiB usable "
             f"(allocated {_gib(plan.predicted_allocated)} GiB{', at ' + plan.peak_phase if plan.peak_phase else ''})"]
    for c in plan.memory:
        where = " [CPU]" if c.device == "cpu" else ""
        phase = c.inputs.get("phase", "always")
        tag = "" if phase == "always" else f" ({phase.replace('_', '/')})"
        lines.append(f"  {c.name:<24}{_gib(c.bytes):>9} GiB{where}{tag}  {c.formula}")
    if any(c.device == "cpu" for c in plan.memory):
        lines.append(f"CPU memory needed per node: {_gib(plan.cpu_memory_needed)} GiB")
    tps = plan.tokens_per_step / plan.step_time_s if plan.step_time_s else 0
    lines.append(f"compute: {plan.flops_per_token:.3g} FLOPs/token, {plan.flops_per_step:.3g} FLOPs/step, "
                 f"{plan.step_time_s:.3g} s/step, {_num(tps)} tokens/s")
    lines += _length_lines(plan)
    for r in plan.rejected:
        lines.append(f"rejected: {r['strategy']} — {r['reason']}")
    lines += [f"note: {n}" for n in plan.notes]
    if plan.calibration:
        lines.append(f"calibration factors applied: {plan.calibration}")
    return lines


def print_plan(plan: Plan, console=None) -> None:
    """Rich rendering: header, memory table with bars, compute/length, rejected alternatives, notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s, m = plan.strategy, plan.model or {}
    console.print(f"[bold]Plan[/bold]: {_strategy_line(plan)}", highlight=False)
    console.print(f"model {m.get('name', '?')}: {_num(m.get('params', 0))} params, "
                  f"{_num(m.get('trainable_params', 0))} trainable (shape from {m.get('source', '?')})", highlight=False)
    console.print(f"resources {_device(plan)}", highlight=False)
    console.print(f"batch {s.micro_batch_size} micro × {s.grad_accum} accum × {plan.world_size} ranks = "
                  f"{plan.global_batch_size} seq × {plan.seq_len} tokens", highlight=False)
    fits = plan.peak_memory <= plan.usable_memory
    t = Table(title=f"memory per {'process' if (plan.resources or {}).get('gpus_per_node') == 0 else 'GPU'}: "
                    f"peak {_gib(plan.peak_memory)} GiB / usable {_gib(plan.usable_memory)} GiB",
              title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("", no_wrap=True)
    t.add_column("formula", overflow="fold")
    scale = max(plan.usable_memory, plan.peak_memory, 1)
    for c in plan.memory:
        n = round(BAR * c.bytes / scale)
        bar = ("[cyan]" if c.device == "gpu" else "[magenta]") + "█" * n + "[/]" if n else ("▏" if c.bytes else "")
        phase = c.inputs.get("phase", "always")
        name = c.name + (" (cpu)" if c.device == "cpu" else "") + ("" if phase == "always" else f" ({phase})")
        t.add_row(name, _gib(c.bytes), bar, c.formula)
    t.add_row("[bold]peak[/bold]", f"[bold]{_gib(plan.peak_memory)}[/bold]",
              ("[green]" if fits else "[red]") + "█" * round(BAR * plan.peak_memory / scale) + "[/]",
              f"alive at the step's largest moment — {plan.peak_phase or 'forward/backward or optimizer step'} — "
              "+ overhead")
    console.print(t)
    if any(c.device == "cpu" for c in plan.memory):
        console.print(f"CPU memory needed per node: {_gib(plan.cpu_memory_needed)} GiB", highlight=False)
    tps = plan.tokens_per_step / plan.step_time_s if plan.step_time_s else 0
    console.print(f"compute {plan.flops_per_token:.3g} FLOPs/token · {plan.flops_per_step:.3g} FLOPs/step · "
                  f"{plan.step_time_s:.3g} s/step · {_num(tps)} tokens/s", highlight=False)
    for line in _length_lines(plan):
        console.print(line, highlight=False)
    if plan.rejected:
        r = Table(title="rejected alternatives", title_justify="left", show_edge=False, pad_edge=False)
        for col in ("strategy", "peak GiB", "tokens/s", "why not"):
            r.add_column(col, overflow="fold")
        for x in plan.rejected:
            r.add_row(x["strategy"], f"{x['peak_gib']:.2f}", _num(x["tokens_per_s"]), x["reason"])
        console.print(r)
    for n in plan.notes:
        console.print(f"[dim]note: {n}[/dim]", highlight=False)
    if plan.calibration:
        console.print(f"[dim]calibration factors applied: {plan.calibration}[/dim]", highlight=False)
