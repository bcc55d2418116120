"""Learning-rate schedules as plain functions of the step (multipliers of the peak LR).

wsd (warmup-stable-decay, Hägele et al.): linear warmup, constant, then a linear cooldown to 0 over
the last `cooldown` steps. Because the stable phase is flat, the governor can end a run at any step
by starting the cooldown early (`begin_cooldown`) — the result matches a run planned that short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class Schedule:
    kind: str  # wsd | cosine | constant
    total_steps: int
    warmup: int
    cooldown: int
    early_stop_at: Optional[int] = None  # step at which a governor-triggered cooldown began
    early_cooldown: Optional[int] = None  # its length (the governor scales it to the steps trained)

    def begin_cooldown(self, step: int, steps: int | None = None) -> int:
        """Start a cooldown of `steps` (default: the planned one) now; -> the step at which training ends."""
        self.early_stop_at = step
        self.early_cooldown = self.cooldown if steps is None else max(0, steps)
        return min(self.total_steps, step + self.early_cooldown)

    def _planned(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))
        decay_start = self.total_steps - self.cooldown
        if step < decay_start:
            return 1.0
        return max(0.0, (self.total_steps - step) / max(1, self.cooldown))

    def __call__(self, step: int) -> float:
        if self.early_stop_at is None or step < self.early_stop_at:
            return self._planned(step)
        start = self._planned(self.early_stop_at)
        left = max(1, self.cooldown if self.early_cooldown is None else self.early_cooldown)
        return start * max(0.0, 1 - (step - self.early_stop_at) / left)
