"""What a run shows while it trains: one plain line per logged step, and on a terminal a progress bar under them.

Step lines (`step=4 loss=0.6416 eval_loss=0.6326 lr=0.002 ...`) are printed in both cases, so they persist on a
terminal and are the whole output in a log. The bar exists only on a terminal, is redrawn at most REFRESH_HZ times
a second (plus once per printed line), and always fits the console width: fields are dropped in a fixed priority
(the step count and the ETA stay; then loss, elapsed, eval loss, budget, throughput) and the bar itself shrinks.

ETA = steps left × median of the last WINDOW measured step seconds + evals left × median of the measured eval
seconds. Before any is measured: the plan's step time (plan.compute.step_time_s) and its predicted eval time (one
eval's FLOPs at the step's predicted FLOP rate), so the ETA is a number from the first redraw on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions
from rich.live import Live
from rich.text import Text

REFRESH_HZ = 1.0  # the bar shows seconds: one redraw a second keeps it current (10 Hz redrew a 16-step run 6,567x)
WINDOW = 64  # measured steps (and evals) in the running median: follows a drift, ignores a slow first step
BAR_MIN, BAR_MAX = 10, 40
LINE_KEYS = ("step", "loss", "eval_loss", "lr", "grad_norm", "tok_per_s")


def step_line(row: dict) -> str | None:
    """The plain line for a logged metrics row (None for rows without a loss)."""
    if "loss" not in row and "eval_loss" not in row:
        return None
    parts = [f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in LINE_KEYS if k in row]
    if isinstance(row.get("fraction_of_budget"), (int, float)):
        parts.append(f"budget={100 * row['fraction_of_budget']:.1f}%")
    if row.get("stop"):
        parts.append(f"stop={row['stop']}")
    return " ".join(parts)


def clock(seconds: float | None) -> str:
    """4:05, 1:04:05, 2d 03:04."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}:{m:02d}"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Eta:
    """Seconds left, from the plan until measured, then from running medians of what was measured."""

    step_s: float  # planned seconds per optimizer step
    eval_s: float = 0.0  # planned seconds per eval
    eval_every: int = 0  # 0: only the final eval
    has_evals: bool = False
    steps: list = field(default_factory=list)
    evals: list = field(default_factory=list)

    @classmethod
    def from_plan(cls, plan: dict) -> "Eta":
        c, ev = plan.get("compute") or {}, plan.get("evals") or {}
        step_s = float(c.get("step_time_s") or 0.0)
        flop_rate = c.get("flops_per_step", 0.0) / step_s if step_s > 0 else 0.0
        eval_s = ev.get("flops", 0.0) / flop_rate if flop_rate > 0 else 0.0
        return cls(step_s, eval_s, int(ev.get("every") or 0), bool(ev.get("sequences")))

    def add_step(self, seconds: float) -> None:
        self.steps = (self.steps + [float(seconds)])[-WINDOW:]

    def add_eval(self, seconds: float) -> None:
        self.evals = (self.evals + [float(seconds)])[-WINDOW:]

    def evals_left(self, step: int, end: int) -> int:
        """Periodic evals at multiples of eval_every strictly between step and end, plus the final one."""
        if not self.has_evals:
            return 0
        periodic = max(0, (end - 1) // self.eval_every - step // self.eval_every) if self.eval_every > 0 else 0
        return periodic + 1

    def per_step(self) -> float:
        return statistics.median(self.steps) if self.steps else self.step_s

    def seconds_left(self, step: int, end: int, since: float = 0.0) -> float:
        """After `step`, with `since` seconds spent on what follows it: that time counts down, by at most one
        step (a step running long does not drive the ETA to zero)."""
        per_eval = statistics.median(self.evals) if self.evals else self.eval_s
        left = max(0, end - step) * self.per_step() + self.evals_left(step, end) * per_eval
        return max(0.0, left - min(since, self.per_step()))


@dataclass
class BarState:
    step: int
    total: int
    started: float = field(default_factory=time.monotonic)
    changed: float = field(default_factory=time.monotonic)  # when the last step or eval ended
    loss: float | None = None
    eval_loss: float | None = None
    tok_per_s: float | None = None
    budget: float | None = None  # fraction of the budget used
    finished: bool = False


class ProgressLine:
    """The bar as a rich renderable: laid out anew for the width of every redraw."""

    def __init__(self, state: BarState, eta: Eta, description: str = "train", now=time.monotonic):
        self.state, self.eta, self.description, self.now = state, eta, description, now

    def fields(self) -> list[tuple[int, str]]:
        """(priority, text) in display order; priority 0 is never dropped."""
        s = self.state
        elapsed = self.now() - s.started
        out = [(0, f"{s.step}/{s.total}")]
        if s.loss is not None:
            out.append((1, f"loss {s.loss:.4g}"))
        if s.eval_loss is not None:
            out.append((3, f"eval {s.eval_loss:.4g}"))
        if s.tok_per_s is not None:
            out.append((5, f"{s.tok_per_s:.3g} tok/s"))
        if s.budget is not None:
            out.append((4, f"budget {100 * s.budget:.1f}%"))
        out.append((2, f"{clock(elapsed)} elapsed"))
        left = self.eta.seconds_left(s.step, s.total, self.now() - s.changed)
        out.append((0, "done" if s.finished else f"ETA {clock(left)}"))
        return out

    def layout(self, width: int) -> tuple[str, int, str]:
        """-> (description, bar width, fields text) with len(description) + 1 + bar + 1 + len(text) <= width. The bar
        takes a fixed share of the width (it does not jump as fields come and go); the fields fill the rest by
        priority; when even the count and the ETA do not fit, the bar shrinks, then the label goes."""
        fields = self.fields()
        keep = {i for i, (p, _) in enumerate(fields) if p == 0}

        def text(idx):
            return "  ".join(t for i, (_, t) in enumerate(fields) if i in idx)

        desc, bar = self.description, max(BAR_MIN, min(BAR_MAX, width // 5))
        for i in sorted((i for i, (p, _) in enumerate(fields) if p), key=lambda i: fields[i][0]):
            if len(desc) + 1 + bar + 1 + len(text(keep | {i})) <= width:
                keep.add(i)
        info = text(keep)
        bar = min(bar, width - len(desc) - 2 - len(info))
        if bar < BAR_MIN:  # a narrow terminal: the count and the ETA beside a short bar, without the label
            desc, bar = "", min(BAR_MIN, width - 1 - len(info))
        return desc, max(0, bar), info

    def render(self, width: int) -> Text:
        desc, bar, info = self.layout(width)
        s = self.state
        filled = bar * min(1.0, s.step / s.total) if s.total > 0 else 0.0
        full, half = int(filled), filled - int(filled) >= 0.5
        done = "bar.finished" if s.finished else "bar.complete"
        line = Text(no_wrap=True, overflow="crop")
        if desc:
            line.append(desc + " ", style="bold")
        if bar:
            line.append("━" * full + ("╸" if half else ""), style=done)
            line.append("━" * (bar - full - half), style="bar.back")
            line.append(" ")
        line.append(info)
        return line

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        yield self.render(options.max_width)


class TerminalBar:
    """The live bar on a terminal console; lines printed through the console appear above it."""

    def __init__(self, console: Console, step: int, total: int, eta: Eta):
        self.state = BarState(step, total)
        self.line = ProgressLine(self.state, eta)
        self.live = Live(self.line, console=console, refresh_per_second=REFRESH_HZ, transient=False,
                         redirect_stdout=True, redirect_stderr=True)
        self.live.start()

    def update(self, row: dict) -> None:
        s = self.state
        step = int(row.get("step", s.step))
        if step > s.step:
            s.step, s.changed = step, time.monotonic()
        for key, attr in (("loss", "loss"), ("eval_loss", "eval_loss"), ("tok_per_s", "tok_per_s"),
                          ("fraction_of_budget", "budget")):
            if isinstance(row.get(key), (int, float)):
                setattr(s, attr, float(row[key]))

    def eval_done(self) -> None:
        self.state.changed = time.monotonic()

    def stop(self) -> None:
        self.state.finished = True
        self.live.stop()  # draws the final state once
