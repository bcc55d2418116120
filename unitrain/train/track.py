"""Where metrics go: metrics.jsonl (always), wandb (online/offline/disabled), the console: a plain line per logged
step, and on a terminal a progress bar under them (unitrain.train.progress)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console

from unitrain.train.checkpoint import die_at, fault
from unitrain.train.progress import Eta, TerminalBar, step_line


HIGH_MARK = ".max_logged_step"


class Tracker:
    """Only rank 0 writes; other ranks get a Tracker with `active=False` that does nothing."""

    def __init__(self, run_dir: Path, recipe, plan_dict: dict, total_steps: int, start_step: int,
                 active: bool = True, console: Console | None = None):
        self.active = active
        self.console = console or Console(stderr=True)
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.progress = None  # the TerminalBar, on a terminal
        self.eta = Eta.from_plan(plan_dict)
        if not active:
            return
        if recipe.output.resume == "never":  # training from scratch: a new wandb run, nothing to skip
            for name in (".wandb_id", HIGH_MARK):
                (run_dir / name).unlink(missing_ok=True)
        logged = resume_metrics(run_dir, start_step, self.console.print)
        # the wandb run (same id) already holds every step logged before: a resumed run re-logs none of them
        self.wandb_done = logged if (run_dir / ".wandb_id").exists() else -1
        mode = recipe.tracking.wandb
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=recipe.tracking.project, name=recipe.name, dir=str(run_dir), mode=mode,
                                    config={"recipe": recipe.to_dict(), "plan": plan_dict}, resume="allow",
                                    id=_wandb_id(run_dir))
        if recipe.tracking.progress and self.console.is_terminal:
            from unitrain.console import adopt_library_loggers

            adopt_library_loggers()  # imported since the command started (DeepSpeed): not onto the bar
            self.progress = TerminalBar(self.console, start_step, total_steps, self.eta)

    def tick(self, step: int, seconds: float) -> None:
        """One optimizer step done (every step, logged or not): the bar's position and the ETA's measurements."""
        if not self.active:
            return
        self.eta.add_step(seconds)
        if self.progress is not None:
            self.progress.update({"step": step})

    def eval_done(self, seconds: float) -> None:
        if self.active:
            self.eta.add_eval(seconds)
            if self.progress is not None:
                self.progress.eval_done()

    def log(self, row: dict) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        line = json.dumps(clean) + "\n"
        with self.path.open("a") as f:
            if fault("torn_metrics", row.get("step")):  # a kill mid-write: half a line, then gone
                f.write(line[: len(line) // 2])
                f.flush()
                die_at("torn_metrics", row.get("step"))
            f.write(line)
        if self.wandb is not None and row.get("step", 0) > self.wandb_done:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))
        if self.progress is not None:  # first: printing the line redraws the bar under it
            self.progress.update(row)
        shown = step_line(row)
        if shown is not None:
            self.console.print(shown, highlight=False, markup=False)

    def set_total(self, total: int) -> None:
        if self.progress is not None:
            self.progress.state.total = total

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb is not None and path.exists():
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        """Idempotent: the loop closes at its end, the run's error path again."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    f = run_dir / ".wandb_id"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


def _parse_rows(text: str) -> tuple[list[tuple[str, dict]], list[int]]:
    """(line, row) pairs and the line numbers that do not parse (a torn last line after a kill mid-write)."""
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except ValueError:
            bad.append(i)
    return rows, bad


def resume_metrics(run_dir: Path, start_step: int, say=print) -> int:
    """Make metrics.jsonl hold exactly the rows of steps <= start_step (those the resumed run does not redo; none
    on a fresh start), dropping torn lines; -> the highest step ever logged in this run directory, -1 if none (kept
    in HIGH_MARK, since the rows dropped here were logged, to wandb too)."""
    path, mark = Path(run_dir) / "metrics.jsonl", Path(run_dir) / HIGH_MARK
    high = int(mark.read_text()) if mark.exists() and mark.read_text().strip().isdigit() else -1
    if not path.exists():
        return high
    rows, bad = _parse_rows(path.read_text())
    if bad:
        say(f"metrics.jsonl: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad))}; a kill "
            f"mid-write leaves a torn last line)")
    high = max([high] + [int(r.get("step", 0)) for _, r in rows])
    keep = [line for line, r in rows if start_step > 0 and r.get("step", 0) <= start_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    mark.write_text(str(high))
    return high


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for _, r in _parse_rows(path.read_text())[0]] if path.exists() else []
