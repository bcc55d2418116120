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
    s = plan.execution
    parts = [s.method, f"ZeRO-{s.zero_stage}" if s.zero_stage else ("DDP" if plan.world_size > 1 else "no ZeRO")]
    if s.offload_optimizer:
        parts.append("optimizer→CPU")
    if s.offload_params:
        parts.append("params→CPU")
    parts += [s.optimizer, f"checkpointing {s.checkpointing}", s.dtype]
    if s.kernels:
        parts.append("kernels " + "+".join(s.kernels))
    return " · ".join(parts)


def _unit(plan: Plan) -> str:
    return "process" if plan.resources.on_cpu else "GPU"


def _device(plan: Plan) -> str:
    r = plan.resources
    if r.on_cpu:
        procs = f"{plan.world_size} processes, " if plan.world_size > 1 else ""
        return f"CPU ({procs}{r.gpu_memory / GiB:.0f} GiB per process)"
    nodes = f"{r.nodes} nodes × " if r.nodes > 1 else ""
    return (f"{nodes}{r.gpus_per_node} × {r.accelerator} ({r.gpu_memory / GiB:.0f} GiB each, CPU "
            f"{r.cpu_memory / GiB:.0f} GiB per node)")


def _length_lines(plan: Plan) -> list[str]:
    L, b = plan.length, plan.budget
    hours = L.steps * plan.compute.step_time_s / 3600
    wall = (f"{hours:.3g} h wall" if plan.resources.on_cpu else
            f"{hours:.3g} h wall = {hours * max(1, plan.world_size):.3g} GPU-hours")
    budget = "none" if not b.kind else f"{b.value:.3g} {b.kind.replace('_', '-')}"
    lines = [f"length: {L.steps} steps (warmup {L.warmup}, cooldown {L.cooldown}), "
             f"{_num(L.steps * L.tokens_per_step)} tokens in {_num(L.steps * L.slots_per_step)} slots, "
             f"{L.steps * plan.compute.flops_per_step:.3g} FLOPs, {wall}; budget {budget}"]
    if b.kind and b.split:
        parts = ", ".join(f"{k} {v / b.value:.1%}" for k, v in b.split.items() if v)
        lines.append(f"budget split: {parts}" + (f"; unspent {b.unspent / b.value:.1%} ({b.unspent_reason})"
                                                  if b.unspent_reason else ""))
    ev = plan.evals
    if ev.sequences:
        when = f"every {ev.every} steps" if ev.every else ("at the start and the end" if ev.initial else
                                                            "the final one only")
        when += "" if ev.stop_rule else ": the stop rule is off"
        lines.append(f"evals: {ev.count} × {ev.sequences} sequences ({_num(ev.tokens)} tokens, {_num(ev.slots)} "
                     f"slots, {ev.flops:.3g} FLOPs each), {when}")
    elif ev.reason:
        lines.append(f"evals: none ({ev.reason})")
    d = plan.data
    lines.append(f"data: {d.policy}, {d.epochs:.2f} epochs; {d.reason}" if d.scanned else f"data: {d.reason}")
    lines.append(_prediction_line(plan))
    return lines


def _prediction_line(plan: Plan) -> str:
    p = plan.prediction
    if p.loss is None:
        return (f"prediction: {_num(p.effective_tokens)} effective tokens; the loss level is unknown until the first "
                f"evals (no measured curve for this model, method, learning rate and data yet)")
    return (f"prediction: eval loss at the end {p.loss:.4f} ({p.coverage:.0%} interval {p.low:.4f}–{p.high:.4f}) at "
            f"{_num(p.effective_tokens)} effective tokens, from the curve measured in {p.source}")


def _calibration_lines(plan: Plan) -> list[str]:
    import time

    def when(t):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "?"

    c, out = plan.calibration, []
    if c.factors:
        factors = ", ".join(f"{k} ×{v:.3g}" for k, v in sorted(c.factors.items()))
        out.append(f"calibration applied: {factors} (measured / predicted, from {c.source or 'an earlier run'} at "
                   f"{when(c.time)}; `unitrain calibrate --list` shows the store, `--reset` clears it)")
    if c.traced:
        factors = ", ".join(f"{k} ×{v:.3g}" for k, v in sorted(c.traced["factors"].items()))
        out.append(f"memory from a trace: {factors} (traced / formula for this model family, "
                   f"{plan.execution.method}, checkpointing {plan.execution.checkpointing}; {c.traced['source']} at "
                   f"{when(c.traced.get('time'))}; `unitrain calibrate --reset {c.traced['key']}` forgets it)")
    return out


def plan_summary_lines(plan: Plan) -> list[str]:
    """The plan in plain text lines: strategy, batch, memory per component, compute, length, rejections."""
    s, m, mem = plan.execution, plan.model, plan.memory
    lines = [f"plan: {_strategy_line(plan)}",
             f"model: {m.name or '?'} ({_num(m.params)} params, {_num(m.trainable_params)} "
             f"trainable; shape from {m.source or '?'})",
             f"resources: {_device(plan)}",
             *[f"assumed: {a}" for a in plan.resources.assumed],
             f"batch: {s.micro_batch_size} micro × {s.grad_accum} accumulation × {plan.world_size} ranks = "
             f"{plan.global_batch_size} sequences × {plan.seq_len} slots",
             f"memory per {_unit(plan)}: peak {_gib(mem.peak)} GiB of {_gib(mem.usable)} GiB usable "
             f"(allocated {_gib(mem.allocated_peak)} GiB{', at ' + mem.peak_phase if mem.peak_phase else ''})"]
    for c in mem.components:
        where = " [CPU]" if c.device == "cpu" else ""
        phase = c.inputs.get("phase", "always")
        tag = "" if phase == "always" else f" ({phase.replace('_', '/')})"
        lines.append(f"  {c.name:<24}{_gib(c.bytes):>9} GiB{where}{tag}  {c.formula}")
    if any(c.device == "cpu" for c in mem.components):
        lines.append(f"CPU memory needed per node: {_gib(mem.cpu_needed)} GiB")
    lines.append(_compute_line(plan))
    lines += _length_lines(plan)
    for r in plan.rejected:
        lines.append(f"rejected: {r['strategy']} — {r['reason']}")
    lines += [f"note: {n}" for n in plan.notes]
    return lines + _calibration_lines(plan)


def _compute_line(plan: Plan) -> str:
    c, L = plan.compute, plan.length
    tps = L.tokens_per_step / c.step_time_s if c.step_time_s else 0
    return (f"compute: {c.flops_per_slot:.3g} FLOPs/slot (forward {c.forward_flops_per_slot:.3g}), "
            f"{c.flops_per_step:.3g} FLOPs/step, {c.step_time_s:.3g} s/step, {_num(tps)} tokens/s")


def print_plan(plan: Plan, console=None) -> None:
    """Rich rendering: header, memory table with bars, compute/length, rejected alternatives, notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s, m, mem = plan.execution, plan.model, plan.memory
    console.print(f"[bold]Plan[/bold]: {_strategy_line(plan)}", highlight=False)
    console.print(f"model {m.name or '?'}: {_num(m.params)} params, {_num(m.trainable_params)} trainable (shape "
                  f"from {m.source or '?'})", highlight=False)
    console.print(f"resources {_device(plan)}", highlight=False)
    for a in plan.resources.assumed:  # what the plan assumed rather than found, and how to change it
        console.print(f"assumed: {a}", highlight=False, markup=False)
    console.print(f"batch {s.micro_batch_size} micro × {s.grad_accum} accum × {plan.world_size} ranks = "
                  f"{plan.global_batch_size} seq × {plan.seq_len} slots", highlight=False)
    fits = mem.peak <= mem.usable
    t = Table(title=f"memory per {_unit(plan)}: peak {_gib(mem.peak)} GiB / usable {_gib(mem.usable)} GiB",
              title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("", no_wrap=True)
    t.add_column("formula", overflow="fold")
    scale = max(mem.usable, mem.peak, 1)
    for c in mem.components:
        n = round(BAR * c.bytes / scale)
        bar = ("[cyan]" if c.device == "gpu" else "[magenta]") + "█" * n + "[/]" if n else ("▏" if c.bytes else "")
        phase = c.inputs.get("phase", "always")
        name = c.name + (" (cpu)" if c.device == "cpu" else "") + ("" if phase == "always" else f" ({phase})")
        t.add_row(name, _gib(c.bytes), bar, c.formula)
    t.add_row("[bold]peak[/bold]", f"[bold]{_gib(mem.peak)}[/bold]",
              ("[green]" if fits else "[red]") + "█" * round(BAR * mem.peak / scale) + "[/]",
              f"alive at the step's largest moment — {mem.peak_phase or 'forward/backward or optimizer step'} — "
              "+ overhead")
    console.print(t)
    if any(c.device == "cpu" for c in mem.components):
        console.print(f"CPU memory needed per node: {_gib(mem.cpu_needed)} GiB", highlight=False)
    console.print(_compute_line(plan), highlight=False)
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
    for cal in _calibration_lines(plan):
        console.print(cal, highlight=False, markup=False)
