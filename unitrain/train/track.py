"""Where metrics go: metrics.jsonl (always), wandb (online/offline/disabled), a rich progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Tracker:
    """Only rank 0 writes; other ranks get a Tracker with `active=False` that does nothing."""

    def __init__(self, run_dir: Path, recipe, plan_dict: dict, total_steps: int, start_step: int,
                 active: bool = True, console: Console | None = None):
        self.active = active
        self.console = console or Console(stderr=True)
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.progress = None
        if not active:
            return
        if start_step > 0 and self.path.exists():  # drop rows the resumed run will redo
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r).get("step", 0) <= start_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        mode = recipe.tracking.wandb
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=recipe.tracking.project, name=recipe.name, dir=str(run_dir), mode=mode,
                                    config={"recipe": recipe.to_dict(), "plan": plan_dict}, resume="allow",
                                    id=_wandb_id(run_dir))
        if recipe.tracking.progress and self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, row: dict) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))
        if self.progress is not None:
            info = " ".join(f"{k}={row[k]:.4g}" for k in ("loss", "eval_loss", "lr", "tok_per_s", "budget_used")
                            if isinstance(row.get(k), (int, float)))
            self.progress.update(self.task, completed=row.get("step", 0), info=info)
        elif "loss" in row or "eval_loss" in row:
            keys = ("step", "loss", "eval_loss", "lr", "grad_norm", "tok_per_s", "budget_used")
            self.console.print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                        for k in keys if k in row), highlight=False)

    def set_total(self, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb is not None and path.exists():
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    f = run_dir / ".wandb_id"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
