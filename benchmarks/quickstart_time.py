"""The quickstart's wall time, today's against an earlier version's, side by side in one run.

Runs `unitrain run recipes/quickstart.yaml` of this checkout ("new") and of an earlier commit ("old", by default
the version issue 12 timed) in alternating order (old, new, new, old, ...) so machine noise hits both, each as a
fresh process with its own empty calibration store and run directory (a new user's first run; the model and data
caches are warmed by one untimed run of each first). Reports per version the median wall time, the ratio, the
held-out exact match before and after, peak RSS, and where the time went (new: summary.json's `seconds`; old: the
step and eval times its metrics.jsonl logged).

    python benchmarks/quickstart_time.py [--runs 3] [--old-ref 3cae07f] [--out benchmarks/results/quickstart_time.md]

The old version runs from a git worktree of --old-ref with this checkout's virtual environment (PYTHONPATH first),
so both use the same packages; on an otherwise idle machine for the numbers the README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_REF = "3cae07f"  # the landed main issue 12 timed (stop 9)


def worktree(ref: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"unitrain-{ref}"
    if not (path / "unitrain").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), ref],
                       check=True, capture_output=True)
    return path


def run_once(checkout: Path, work: Path) -> dict:
    """One quickstart in a fresh process: wall seconds, peak RSS, exact match, the phase times."""
    out = work / "out"
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "UNITRAIN_CALIBRATION": str(work / "calibration.json")}
    cmd = [sys.executable, "-m", "unitrain", "run", "recipes/quickstart.yaml", f"output.dir={out}",
           "tracking.progress=false"]
    log = work / "run.log"
    work.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{checkout}: the quickstart failed:\n{log.read_text()[-3000:]}")
    run_dir = out / "quickstart"
    em = json.loads((run_dir / "exact_match.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    phases = summary.get("seconds") or {"steps": sum(r.get("step_s", 0.0) for r in rows)}
    return {"wall": wall, "rss_gib": usage.ru_maxrss / 2**20, "em_before": em["before"],
            "em_after": em["after"], "eval_loss": summary.get("final_eval_loss"), "steps": summary.get("steps"),
            "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each version")
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/quickstart_time.md")
    args = ap.parse_args()
    args.load_before = os.getloadavg()[0]  # a busy machine slows both versions, not their ratio
    versions = {"old": worktree(args.old_ref), "new": REPO}
    results: dict[str, list[dict]] = {"old": [], "new": []}
    order = [("old", "new") if i % 2 == 0 else ("new", "old") for i in range(args.runs)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkout in versions.items():  # warm the model and data caches (not timed)
            print(f"warm-up: {name}", flush=True)
            run_once(checkout, Path(tmp) / f"warm-{name}")
        for i, pair in enumerate(order):
            for name in pair:
                r = run_once(versions[name], Path(tmp) / f"{name}-{i}")
                results[name].append(r)
                print(f"run {i} {name}: {r['wall']:.1f} s, exact match {r['em_before']:.3f} -> {r['em_after']:.3f}",
                      flush=True)
    text = report(results, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def report(results: dict, args) -> str:
    med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    lines = [f"# Quickstart wall time: this checkout vs {args.old_ref}", "",
             f"`python benchmarks/quickstart_time.py --runs {args.runs} --old-ref {args.old_ref}` — "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, 1-minute load average "
             f"{args.load_before:.2f} when it started; alternating order, one untimed warm-up each; the wall time is "
             f"the whole process, `total` below is from the start of run_recipe.", "",
             "| version | runs (s) | median wall | ratio | exact match before → after (gain) | final eval loss | "
             "peak RSS |", "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        walls = ", ".join(f"{r['wall']:.1f}" for r in rows)
        em = f"{rows[0]['em_before']:.3f} → {statistics.median(r['em_after'] for r in rows):.3f} " \
             f"(+{100 * (statistics.median(r['em_after'] for r in rows) - rows[0]['em_before']):.1f} pts)"
        lines.append(f"| {name} | {walls} | {med[name]:.1f} s | {med[name] / med['old']:.2f} | {em} | "
                     f"{statistics.median(r['eval_loss'] for r in rows):.4f} | "
                     f"{max(r['rss_gib'] for r in rows):.2f} GiB |")
    lines += ["", "Where the time went (median seconds per phase; old: only the step and eval times its metrics "
              "logged):", ""]
    names = list(dict.fromkeys(k for rows in results.values() for r in rows for k in r["phases"]))
    lines += ["| phase | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for n in names:
        cells = []
        for rows in results.values():
            vals = [r["phases"][n] for r in rows if n in r["phases"]]
            cells.append(f"{statistics.median(vals):.1f}" if vals else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
