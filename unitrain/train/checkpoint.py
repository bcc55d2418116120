"""Atomic checkpoints: `checkpoints/step-N/` is complete or absent, never half-written.

A checkpoint is written into a hidden temporary folder, finished with a `COMPLETE` marker, then
renamed into place (rename is atomic on one filesystem). Only after that are older checkpoints
pruned to the newest `keep_last`. `resume: auto` picks the newest complete one; a damaged one is an
error that names it — it is never silently skipped or overwritten.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from unitrain.errors import CheckpointError

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP.match(p.name)
        if m and (p / MARKER).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(ckpt_dir: Path, step: int, backend, trainer_state: dict, keep_last: int,
                    rank: int = 0, barrier=lambda: None) -> Path:
    """Write step-N atomically (all ranks call this: the backend may save collectively)."""
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    backend.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, default=float))
        (tmp / MARKER).write_text(str(step))
        if final.exists():  # same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        for _, old in list_complete(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def find_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None (fresh start), newest complete (auto), or an explicit path."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not (path / MARKER).exists():
            raise CheckpointError(f"output.resume={resume}: not a complete unitrain checkpoint (no {MARKER} marker). "
                                  f"Point it at a checkpoints/step-N folder, or use resume=auto")
        return path
    done = list_complete(ckpt_dir)
    return done[-1][1] if done else None


def load_checkpoint(path: Path, backend, rank: int = 0) -> dict:
    """Restore the backend state and this rank's RNG; -> trainer_state. Errors name the fix."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        backend.load(path)
        rng_file = path / f"rng-rank{rank}.pt"
        if not rng_file.exists():
            rng_file = path / "rng-rank0.pt"
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is damaged or does not match this recipe ({type(e).__name__}: {e}). Nothing was "
            f"deleted. Resume from an older one with output.resume=<path to another step-N>, or start over in a "
            f"new run directory (name=...) — or remove {path} if you are sure it is broken") from None
    return state
