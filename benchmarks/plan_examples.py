"""`unitrain plan` on the three example recipes (8B LoRA on 1×24 GiB, 8B full on 8×80 GiB, 70B QLoRA on 1×80 GiB),
then the hardware advisor on recipes/llama-lora.yaml (README, "Before you rent"), each timed as a whole command
(interpreter start included), as on a machine without a GPU (CUDA_VISIBLE_DEVICES=""); writes
benchmarks/results/plan_examples.txt.

    python benchmarks/plan_examples.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["plan-llama8b-lora-24g.yaml", "plan-llama8b-full-8x80g.yaml", "plan-llama70b-qlora-80g.yaml"]
ADVISE = ["recipes/llama-lora.yaml", "--advise", "--deadline", "12h"]


def main() -> None:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        # no calibration file: the printed plans are the uncalibrated model's
        env = dict(os.environ, COLUMNS="110", UNITRAIN_CALIBRATION=str(Path(tmp) / "calibration.json"),
                   CUDA_VISIBLE_DEVICES="")
        for args in [[f"recipes/{name}"] for name in RECIPES] + [ADVISE]:
            cmd = [sys.executable, "-m", "unitrain", "plan", *args]
            t = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode:
                sys.exit(f"{args[0]}: unitrain plan failed ({res.returncode}):\n{res.stderr}")
            out.append(f"$ COLUMNS=110 unitrain plan {' '.join(args)}\n{res.stdout.rstrip()}\n"
                       f"(wall time of the whole command on a {os.cpu_count()}-core machine: {wall:.2f} s)\n")
    text = "\n".join(out)
    print(text)
    (ROOT / "benchmarks" / "results" / "plan_examples.txt").write_text(text)


if __name__ == "__main__":
    main()
