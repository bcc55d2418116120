"""Two CPU processes through the launchers (gloo): same losses as one process, collective SIGTERM + resume,
and a dead rank ending the other in bounded time. Each launch has its own port and a timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from unitrain.recipe import recipe_to_yaml
from unitrain.train.track import read_metrics

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
LAUNCH_TIMEOUT = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "UNITRAIN_DIST_TIMEOUT": "60"}


def _torchrun(recipe_file: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
            "-m", "unitrain", "run", str(recipe_file), *overrides]


def _deepspeed(recipe_file: Path, *overrides: str) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", "2", "--master_port", str(_port()),
            str(Path(sys.executable).parent / "unitrain"), "run", str(recipe_file), *overrides]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path):
    def make(name, **kw):
        r = tiny_recipe(name=name, **{"training.micro_batch_size": 1, "training.max_steps": 4,
                                      "resources.gpus_per_node": "auto", "output.save_every": 0, **kw})
        f = tmp_path / f"{name}.yaml"
        f.write_text(recipe_to_yaml(r))
        return r, f

    return make


def _single(recipe_file_path: Path, *overrides):
    out = subprocess.run([sys.executable, "-m", "unitrain", "run", str(recipe_file_path), *overrides], env=_env(),
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_processes_match_one_process(recipe_file, launcher):
    r1, f1 = recipe_file("one")
    _single(f1)
    r2, f2 = recipe_file(f"two-{launcher}")
    cmd = _torchrun(f2) if launcher == "torchrun" else _deepspeed(f2)
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("done: 4 steps") == 1  # only rank 0 reports
    one, two = _losses(r1.run_dir), _losses(r2.run_dir)
    assert list(two) == [1, 2, 3, 4]
    for step in one:  # same global batch; gloo's summation order differs from one process's
        assert two[step] == pytest.approx(one[step], rel=1e-5), (one, two)
    assert (r2.run_dir / "final" / "config.json").exists()


def _wait_for_steps(run_dir: Path, n: int, proc, deadline: float) -> None:
    while time.time() < deadline and proc.poll() is None:
        if len([r for r in read_metrics(run_dir) if "loss" in r]) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not reach the expected step in time")


def _rank_pids(proc) -> list[int]:
    kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if "unitrain" in " ".join(c.cmdline())]
    return sorted(k.pid for k in kids)


def test_sigterm_on_one_rank_checkpoints_collectively_and_resume_continues(recipe_file):
    ref, fref = recipe_file("ref", **{"training.max_steps": 8})
    _single(fref)
    r, f = recipe_file("preempted", **{"training.max_steps": 8})
    proc = subprocess.Popen(_torchrun(f), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(r.run_dir, 2, proc, time.time() + LAUNCH_TIMEOUT)
    pids = _rank_pids(proc)
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGTERM)  # preempt one rank only
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert "SIGTERM: saved checkpoint" in out, out[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (r.run_dir / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 8
    done = subprocess.run(_torchrun(f), env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    got, want = _losses(r.run_dir), _losses(ref.run_dir)
    assert list(got) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)


def test_a_dead_rank_ends_the_other_with_an_error_in_bounded_time(recipe_file):
    r, f = recipe_file("dies", **{"training.max_steps": 500})
    proc = subprocess.Popen(_torchrun(f), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(r.run_dir, 1, proc, time.time() + LAUNCH_TIMEOUT)
    os.kill(_rank_pids(proc)[-1], signal.SIGKILL)
    t0 = time.time()
    out, _ = proc.communicate(timeout=120)
    assert time.time() - t0 < 90
    assert proc.returncode != 0
    assert "another rank failed or stopped answering" in out, out[-3000:]


def test_world_size_conflict_names_both_numbers(tiny_recipe):
    from unitrain.errors import UnitrainError
    from unitrain.resources import resolve_resources

    r = tiny_recipe(**{"resources.gpus_per_node": 3})
    with pytest.raises(UnitrainError, match=r"launcher started 2 processes .* = 3"):
        resolve_resources(r.resources, world_size=2)
