"""Fault injection (issue 15): the trainer in subprocesses killed at named points of save and prune, a torn metrics
line, a write that fails (RLIMIT_FSIZE), and a second run into a busy directory. After each fault every complete
checkpoint is still there and verifies, no `step-N` is half-written or half-deleted, and the run that finally
finishes has exactly the uninterrupted run's losses (CPU is bitwise deterministic).

UNITRAIN_FAULT=<point>@<step> makes the trainer os._exit(137) there, as kill -9 would (unitrain/train/checkpoint.py).
A tiny Llama (vocabulary 64) on a generated word text with a word-level tokenizer (conftest's word_corpus): each
process takes seconds.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unitrain.errors import RunLockedError
from unitrain.recipe import load_recipe
from unitrain.train import checkpoint as ckpt
from unitrain.train.run import run_recipe
from unitrain.train.track import read_metrics

from conftest import word_recipe_dict

STEPS = 8
KILLED = 137


def _recipe(corpus: Path, root: Path, name: str) -> Path:
    from omegaconf import OmegaConf

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(word_recipe_dict(corpus, root, name))))
    return path


def _env(fault: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "500"}  # no wrapped lines
    env.pop("UNITRAIN_FAULT", None)
    if fault:
        env["UNITRAIN_FAULT"] = fault
    return env


def _launch(recipe: Path, fault: str | None = None, fsize: int | None = None, **kw):
    def limit():  # a file may grow to `fsize` bytes, then writes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, "-m", "unitrain", "run", str(recipe)], env=_env(fault),
                            cwd=recipe.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=limit if fsize else None, **kw)


def _run(recipe: Path, fault: str | None = None, fsize: int | None = None) -> tuple[int, str]:
    proc = _launch(recipe, fault, fsize)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _losses(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "eval": {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}}


def _state(run_dir: Path) -> tuple[dict[int, str], list[str]]:
    """{step: verification status} of the `step-N` folders, and every other name in checkpoints/ (but the kept
    pre-cooldown checkpoint, which --extend continues from)."""
    ck = run_dir / "checkpoints"
    steps = {s: ckpt.verify(p)[0] for s, p in ckpt.list_complete(ck)}
    named = {p.name for _, p in ckpt.list_complete(ck)}
    assert not [p.name for p in ck.glob("step-*") if p.name not in named and "." not in p.name], \
        "a step-N folder without its marker"
    return steps, sorted(p.name for p in ck.iterdir() if p.name not in named
                         and not ckpt.PRE_COOLDOWN.match(p.name)) if ck.is_dir() else []


@pytest.fixture(scope="module")
def reference(word_corpus, tmp_path_factory) -> dict:
    recipe = _recipe(word_corpus, tmp_path_factory.mktemp("ref"), "ref")
    rc, out = _run(recipe)
    assert rc == 0, out
    return _losses(recipe.parent / "ref")


def test_kills_in_save_and_prune_a_torn_line_and_a_full_disk_lose_nothing(word_corpus, reference, tmp_path):
    recipe = _recipe(word_corpus, tmp_path, "chain")
    run = tmp_path / "chain"
    assert sorted(reference["loss"]) == list(range(1, STEPS + 1))

    # 1. killed after writing step 2's files, before its marker: nothing complete yet, a temp folder left
    rc, out = _run(recipe, "before_marker@2")
    assert rc == KILLED, out
    assert _state(run) == ({}, [".tmp-step-2"])

    # 2. the relaunch removes it, starts over, completes step 2, and is killed with step 4's marker written but the
    #    folder not yet renamed into place
    rc, out = _run(recipe, "after_marker@4")
    assert rc == KILLED, out
    assert "removed .tmp-step-2" in out
    assert _state(run) == ({2: "verified"}, [".tmp-step-4"])
    step2 = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-2").iterdir()}

    # 3. a write that fails: every file may hold 256 KiB, the weights need 500: a clear error, exit non-zero, the
    #    temporary folder removed, step 2 untouched
    rc, out = _run(recipe, fsize=256 * 1024)
    assert rc == 2, out
    assert "could not write checkpoint step-4 into" in out and "free on that filesystem" in out, out
    assert "Traceback" not in out and "step-2" in out
    assert _state(run) == ({2: "verified"}, [])
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-2").iterdir()} == step2

    # 4. killed after step 4 is in place, before pruning (keep_last=1): one more checkpoint than kept, both intact
    rc, out = _run(recipe, "after_rename@4")
    assert rc == KILLED, out
    assert "resumed from" in out and "step-2 at step 2" in out
    assert _state(run) == ({2: "verified", 4: "verified"}, [])

    # 5. killed halfway through deleting an old checkpoint: it had left the step-N namespace first
    rc, out = _run(recipe, "mid_prune@6")
    assert rc == KILLED, out
    steps, others = _state(run)
    assert steps == {4: "verified", 6: "verified"} and len(others) == 1 and others[0].startswith(".trash-step-2-")
    assert not (run / "checkpoints" / others[0] / "COMPLETE").exists() or \
        ckpt.verify(run / "checkpoints" / others[0])[0] == "damaged"  # the half-deleted one

    # 6. the relaunch cleans the trash, resumes from step 6, and is killed in the middle of writing step 7's
    #    metrics row: a torn last line
    rc, out = _run(recipe, "torn_metrics@7")
    assert rc == KILLED, out
    assert "removed .trash-step-2-" in out and "step-6 at step 6" in out
    assert _state(run) == ({4: "verified", 6: "verified"}, [])
    last = (run / "metrics.jsonl").read_text().splitlines()[-1]
    with pytest.raises(ValueError):
        json.loads(last)

    # 7. the last relaunch repairs the line, resumes from step 6 and finishes
    rc, out = _run(recipe)
    assert rc == 0, out
    assert "metrics.jsonl: dropped 1 unreadable line" in out, out
    assert "step-6 at step 6" in out
    assert _state(run) == ({8: "verified"}, [])
    assert _losses(run) == reference  # every step's train and eval loss, bit for bit
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1))  # each row once
    assert (run / "final" / "config.json").exists() and not (run / ".lock").exists()


def test_a_second_run_into_a_busy_directory_is_refused_naming_the_holder(word_corpus, reference, tmp_path):
    recipe = _recipe(word_corpus, tmp_path, "busy")
    run = tmp_path / "busy"
    first = _launch(recipe)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / ".lock").exists():
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    holder = json.loads((run / ".lock").read_text())
    assert holder["pid"] == first.pid
    # the second run, in this process: it reaches the lock in milliseconds, while the first is still loading
    with pytest.raises(RunLockedError) as e:
        run_recipe(load_recipe(recipe))
    first_out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_out
    assert f"is in use by another unitrain run: pid {first.pid} on host {socket.gethostname()}, since" in str(e.value)
    assert _losses(run) == reference  # the first run was not disturbed: every row once, the same numbers
    assert not (run / ".lock").exists()
