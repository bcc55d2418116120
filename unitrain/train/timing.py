"""Where a run's wall time went: named phases summed over the run, for summary.json ("seconds") and the last line
`unitrain run` prints. A phase is wall time on the main process; "other" is what no phase claimed (argument
parsing, the plan report, the lock), so the parts always add up to the total."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from unitrain.train.progress import clock

# The order the phases happen in (and are printed in); a phase not listed prints after these.
ORDER = ("startup", "data", "plan", "model", "exact match", "steps", "evals", "checkpoints", "export")


@dataclass
class Timings:
    start: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self, now: float | None = None) -> dict[str, float]:
        """{phase: seconds} in run order, plus "other" and "total" (from this object's making to `now`)."""
        total = (time.perf_counter() if now is None else now) - self.start
        names = [n for n in ORDER if n in self.seconds] + [n for n in self.seconds if n not in ORDER]
        out = {n: round(self.seconds[n], 2) for n in names}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        out["total"] = round(total, 2)
        return out


def time_line(report: dict[str, float]) -> str:
    """`time 2:41: steps 1:50 (68%), exact match 0:25 (16%), ...`: the phases of at least 1% of the total,
    largest first."""
    total = report.get("total") or 0.0
    parts = sorted(((s, n) for n, s in report.items() if n != "total"), reverse=True)
    shown = [f"{n} {clock(s)} ({100 * s / total:.0f}%)" for s, n in parts if total and s >= 0.01 * total]
    return f"time {clock(total)}: " + ", ".join(shown)

