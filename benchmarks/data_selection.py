"""Data selection against a random subset of the same token count, trained the same way (issue 6).

For each task, budget B (a fraction of the pool's tokens) and seed, two subsets of the same pool:
  selected  unitrain.data.select.select_subset(pool, B, encoder="default", seed) — the selector as
            `unitrain run` calls it: filters, exact/MinHash/embedding dedup, k-means strata, prototype
            difficulty (easiest first below ρ = 25 % of the clean tokens, hardest above);
  random    unitrain.data.select.random_subset(pool, selected.tokens_kept, seed) — the same token
            count drawn uniformly from the whole pool, no cleaning;
each written to a jsonl, trained from the same initialisation (the seed) for the same number of steps
(one pass over the selected subset's tokens), and scored on a fixed held-out set. Reported per budget:
held-out loss mean ± sd over seeds for both, Δ = selected − random (paired by seed), its paired t
statistic (mean / (sd / √seeds); below the two-sided 5 % critical value, 4.30 at 3 seeds and 2.78 at 5,
the difference is within seed noise) and the wins.
Ablation, where the selector chose hard-first (select_with_hard): the same selector forced to its
easy-first ordering (select.HARD_SWITCH patched to 1), trained the same way — it tells whether a loss
against random comes from the hard-first switch or from the rest of the selector.

Setup, sized for a shared 2-core CPU (one thread):
- gsm8k-sft: supervised fine-tuning (loss on the answers) on a pool of 1,500 GSM8K training rows
  (a fixed permutation), held-out = the first 200 rows of GSM8K test.
  c4-text: raw-text training (loss on every token) on C4 demo documents 0–249, held-out = 250–299.
- A 1024-token byte-level BPE trained here on the two pools (not the held-out rows): with SmolLM2's 49k
  vocabulary the output layer is ~95 % of a tiny model's compute and a run of the 40 % budget took
  minutes. The model is a 0.4M-parameter Llama from a config, trained from scratch: a selection
  effect has to show up in what a small model learns from B tokens, not in a pretrained model's prior.
- Exact match is not measured: a 0.4M-parameter model trained from scratch on ≤ 0.2M tokens answers no
  GSM8K problem (exact match 0 for every subset), so only the held-out loss can separate them.
- Held-out loss = token-mean cross-entropy of the exported model over all held-out sequences (answer
  tokens for SFT, every token for text); the trainer's own evals see one batch only (cheap).
- The selector's embeddings (all-MiniLM-L6-v2, CPU) are cached under the work folder by unitrain
  (keyed by the texts embedded: below 25 % of the clean tokens only a random candidate set of 4× the
  budget is embedded, which differs per seed). The selector's wall time per selection is reported.

Run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/data_selection.py
     (about 20 minutes on one shared CPU thread; --quick for a smoke run that writes no result)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "data_selection.md"
BUDGETS = (0.05, 0.15, 0.40)  # fractions of the pool's tokens
MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 1024,
         "tie_word_embeddings": True}


@dataclass
class Task:
    name: str
    fmt: str  # unitrain data.format
    seq_len: int
    batch: int  # global = micro batch: one forward per step
    lr: float
    pool_rows: list  # raw rows in the dataset's own columns
    heldout_rows: list


def load_tasks(pool_size: int) -> list[Task]:
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").open()]
    perm = np.random.default_rng(0).permutation(len(rows))
    test = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").open()]
    c4 = [json.loads(line) for line in (DATA / "pretrain" / "c4_demo.jsonl").open()]
    return [Task("gsm8k-sft", "qa", 512, 2, 3e-3, [rows[i] for i in perm[:pool_size]], test[:200]),
            Task("c4-text", "text", 256, 4, 3e-3, c4[:250], c4[250:])]


# ------------------------------------------------------------------------------------------- setup
def train_tokenizer(out: Path, tasks: list[Task]) -> Path:
    """A byte-level BPE with 1024 tokens on the training pools (seconds; cached in `out`)."""
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for t in tasks:
            for r in t.pool_rows:
                yield r["text"] if t.fmt == "text" else r["question"] + "\n" + r["answer"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=MODEL["vocab_size"],
                                                         special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def recipe_dict(task: Task, tokenizer: Path, train: Path, heldout: Path, seed: int, steps: int, out_dir: Path,
                name: str) -> dict:
    return {
        "name": name,
        "model": {"config": dict(MODEL), "tokenizer": str(tokenizer)},
        "data": {"train": str(train), "eval": str(heldout), "format": task.fmt, "max_length": task.seq_len,
                 "select": False},  # the subset is already chosen: train on exactly these rows
        "method": {"name": "full"},
        "training": {"lr": task.lr, "global_batch_size": task.batch, "micro_batch_size": task.batch,
                     "max_steps": steps, "eval_every": 0, "eval_max_batches": 1, "exact_match_examples": 0,
                     "seed": seed, "gradient_checkpointing": "off", "kernels": "off", "log_every": 10_000},
        "resources": {"gpus_per_node": 0},
        "stopping": {"enabled": False},
        "output": {"dir": str(out_dir), "save_every": 0, "keep_last": 1, "resume": "never", "overwrite": True},
        "tracking": {"progress": False},
    }


@dataclass
class Pool:
    records: list  # unitrain's canonical records ({"prompt", "response", "n_tokens", ...}), what the selector sees
    tokens: int
    fill: float  # real tokens per packed sequence slot
    heldout: Path


def scan_pool(task: Task, tokenizer: Path, work: Path) -> Pool:
    """Tokenize the pool with unitrain's own pipeline: the records and token counts `unitrain run` would use."""
    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.recipe import validate

    pool = write_jsonl(work / task.name / "pool.jsonl", task.pool_rows)
    heldout = write_jsonl(work / task.name / "heldout.jsonl", task.heldout_rows)
    r = validate(recipe_dict(task, tokenizer, pool, heldout, 0, 1, work / "runs", "scan"))
    tok_ = M.load_tokenizer(r.model)
    data = pipeline.tokenize_data(r, tok_)
    stats = pipeline.data_stats(data, r, tok_.pad_token_id)
    return Pool(data.train_records, stats.total_tokens, stats.total_tokens / (stats.n_sequences * task.seq_len),
                heldout)


def subset_rows(task: Task, records: list, indices: list[int]) -> list[dict]:
    if task.fmt == "text":
        return [{"text": records[i]["response"]} for i in indices]
    return [{"question": records[i]["prompt"], "answer": records[i]["response"]} for i in indices]


# ------------------------------------------------------------------------------------------- runs
def heldout_loss(run_dir: Path, recipe) -> tuple[float, int]:
    """Token-mean loss of the exported model over every held-out sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.data.tokenize import IGNORE

    tok = M.load_tokenizer(recipe.model)
    seqs = pipeline.finalize(pipeline.tokenize_data(recipe, tok), recipe, tok.pad_token_id).eval
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    total, count, b = 0.0, 0, 8
    with torch.no_grad():
        for s in range(0, len(seqs), b):
            batch = seqs.batch(list(range(s, min(len(seqs), s + b))))
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            if n:
                out = model(**batch, num_items_in_batch=torch.tensor(n))
                total, count = total + float(out.loss) * n, count + n
    return total / count, count


def train_subset(task: Task, tokenizer: Path, pool: Pool, indices: list[int], seed: int, steps: int,
                 work: Path, name: str) -> dict:
    from rich.console import Console

    from unitrain.recipe import validate
    from unitrain.train.run import run_recipe

    train = write_jsonl(work / task.name / "subsets" / f"{name}.jsonl", subset_rows(task, pool.records, indices))
    r = validate(recipe_dict(task, tokenizer, train, pool.heldout, seed, steps, work / "runs", name))
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        res = run_recipe(r, console=Console(file=null))
    held, n = heldout_loss(res.run_dir, r)
    return {"examples": len(indices), "tokens": sum(pool.records[i]["n_tokens"] for i in indices),
            "steps": res.steps, "heldout_loss": held, "heldout_tokens": n, "wall_s": time.perf_counter() - t0}


def run_cell(task: Task, tokenizer: Path, pool: Pool, frac: float, seed: int, work: Path) -> dict:
    from unittest import mock

    from unitrain.data import select
    from unitrain.data.select import random_subset, select_subset

    budget = int(frac * pool.tokens)
    t0 = time.perf_counter()
    sel = select_subset(pool.records, budget, seq_len=task.seq_len, seed=seed, encoder="default",
                        batch_size=task.batch, cache_dir=work / "cache" / "embeddings")
    sel_s = time.perf_counter() - t0
    rnd = random_subset(pool.records, sel.tokens_kept, seed=seed)
    # One pass over the selected tokens, the same number of steps for both subsets.
    steps = max(2, round(sel.tokens_kept / (task.batch * task.seq_len * pool.fill)))
    rep = sel.report()
    cell = {"task": task.name, "budget": frac, "seed": seed, "budget_tokens": budget, "steps": steps,
            "policy": sel.policy, "selector_s": sel_s, "selector_flops": sel.selector_flops,
            "embed_s": rep["details"].get("seconds", {}).get("embed"), "dropped": rep["dropped_by_reason"]}
    tag = f"{task.name}-b{frac:g}-s{seed}"
    cell["selected"] = train_subset(task, tokenizer, pool, sel.indices, seed, steps, work, f"{tag}-selected")
    cell["random"] = train_subset(task, tokenizer, pool, rnd, seed, steps, work, f"{tag}-random")
    if sel.policy == "select_with_hard":
        with mock.patch.object(select, "HARD_SWITCH", 1.0):
            easy = select.select_subset(pool.records, budget, seq_len=task.seq_len, seed=seed, encoder="default",
                                        batch_size=task.batch, cache_dir=work / "cache" / "embeddings")
        cell["easy_first"] = train_subset(task, tokenizer, pool, easy.indices, seed, steps, work, f"{tag}-easy")
    return cell


# ------------------------------------------------------------------------------------------- report
def mean_sd(xs: list[float], fmt: str = ".4f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):{fmt}} ± {sd:{fmt.lstrip('+')}}"


def t_stat(d: list[float]) -> float:
    """Paired t statistic of the per-seed differences: mean / standard error."""
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return statistics.fmean(d) / (sd / len(d) ** 0.5) if sd > 0 else float("nan")


def _verdict(d: list[float]) -> str:
    """Mean paired difference, its t statistic, and whether that is within seed noise."""
    import scipy.stats

    n, t = len(d), t_stat(d)
    crit = float(scipy.stats.t.ppf(0.975, n - 1)) if n > 1 else float("inf")
    noise = f" (within seed noise: |t| < {crit:.2f}, the 5 % critical value)" if not abs(t) >= crit else ""
    return f"mean Δ {statistics.fmean(d):+.4f}, t {t:+.1f}{noise}, lower in {sum(x < 0 for x in d)}/{n} seeds"


def report(cells: list[dict], pools: dict, command: str, wall: float, reused: int) -> str:
    cell_s = sum(c["selector_s"] + sum(c[k]["wall_s"] for k in ("selected", "random", "easy_first") if k in c)
                 for c in cells)
    lines = ["# Data selection: selected subset vs a random subset of the same token count", "",
             f"Command: `{command}`", "",
             f"Compute of the {len(cells)} cells (selection + training + held-out loss) {cell_s / 60:.1f} min"
             + (f"; this invocation {wall / 60:.1f} min, reusing {reused} cells finished earlier in the same work "
                f"folder" if reused else f"; wall time {wall / 60:.1f} min")
             + " (one CPU thread on a shared 2-core machine). Setup: the module docstring of "
               "benchmarks/data_selection.py. Held-out loss (lower is better), mean ± sd over seeds; Δ = selected − "
               "random, paired by seed (same initialisation, same steps); t = mean Δ / (sd / √seeds); wins = seeds "
               "where the selected subset's held-out loss is lower. Exact match is not reported: the "
               "0.4M-parameter from-scratch model solves no GSM8K problem with any subset.", ""]
    for name, p in pools.items():
        cs = [c for c in cells if c["task"] == name]
        lines.append(f"- {name}: pool {len(p.records):,} examples, {p.tokens:,} tokens (1024-token BPE); "
                     f"{len(cs)} selections took {sum(c['selector_s'] for c in cs):.0f} s, of which embedding "
                     f"{sum(c['embed_s'] or 0 for c in cs):.0f} s (0 on a cache hit), selector FLOPs "
                     f"{sum(c['selector_flops'] for c in cs):.3g}")
    lines += ["", "## Summary", "",
              ("| task | budget | tokens | steps | policy | selected | random | Δ (sel − rnd) | t | wins | target | "
               "ablation: easy-first − random (wins) |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for name in pools:
        for frac in sorted({c["budget"] for c in cells if c["task"] == name}):
            cs = [c for c in cells if c["task"] == name and c["budget"] == frac]
            s = [c["selected"]["heldout_loss"] for c in cs]
            r = [c["random"]["heldout_loss"] for c in cs]
            d = [a - b for a, b in zip(s, r)]
            ok = statistics.fmean(s) <= statistics.fmean(r)
            wins = sum(x < 0 for x in d)
            easy = [(c["easy_first"]["heldout_loss"] - c["random"]["heldout_loss"]) for c in cs if "easy_first" in c]
            verdicts.append(f"- {name} at {frac:.0%}: selected − random: {_verdict(d)} — "
                            f"{'meets' if ok else 'does NOT meet'} the target")
            if easy:
                vs_hard = [c["easy_first"]["heldout_loss"] - c["selected"]["heldout_loss"] for c in cs]
                verdicts.append(f"  - ablation, easy-first instead of {cs[0]['policy']}: easy-first − random: "
                                f"{_verdict(easy)}; easy-first − {cs[0]['policy']}: {_verdict(vs_hard)}")
            lines.append(f"| {name} | {frac:.0%} | {statistics.fmean(c['selected']['tokens'] for c in cs):,.0f} | "
                         f"{cs[0]['steps']} | {', '.join(sorted({c['policy'] for c in cs}))} | {mean_sd(s)} | "
                         f"{mean_sd(r)} | {mean_sd(d, '+.4f')} | {t_stat(d):+.1f} | {wins}/{len(cs)} | "
                         f"{'met' if ok else 'NOT met'} | "
                         + (f"{mean_sd(easy, '+.4f')} ({sum(x < 0 for x in easy)}/{len(easy)})" if easy else "–")
                         + " |")
    lines += ["", "## Against the target (selected ≤ random held-out loss at every budget)", ""]
    lines += verdicts
    lines += ["", "## Every run", "",
              ("| task | budget | seed | steps | policy | dropped by the selector | selector s | "
               "selected: examples / tokens / loss | random: examples / tokens / loss | easy-first ablation: "
               "examples / tokens / loss | train wall s (sel, rnd) |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        s, r, e = c["selected"], c["random"], c.get("easy_first")
        lines.append(f"| {c['task']} | {c['budget']:.0%} | {c['seed']} | {c['steps']} | {c['policy']} | "
                     f"{c['dropped']} | {c['selector_s']:.1f} | {s['examples']} / {s['tokens']:,} / "
                     f"{s['heldout_loss']:.4f} | {r['examples']} / {r['tokens']:,} / {r['heldout_loss']:.4f} | "
                     + (f"{e['examples']} / {e['tokens']:,} / {e['heldout_loss']:.4f}" if e else "–")
                     + f" | {s['wall_s']:.0f}, {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--tasks", nargs="+", default=["gsm8k-sft", "c4-text"])
    ap.add_argument("--pool", type=int, default=1500, help="GSM8K training rows in the pool")
    ap.add_argument("--work", default=None, help="scratch folder: tokenizer, caches, subsets, runs, results.jsonl "
                                                 "(a rerun with the same folder skips finished cells)")
    ap.add_argument("--out", default=str(RESULTS), help="markdown report ('' = print only)")
    ap.add_argument("--quick", action="store_true", help="seed 0, the 5%% budget, a 300-row pool; writes no report")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"real data folder {DATA} is missing (it sits beside the repository)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.quick:
        args.seeds, args.budgets, args.pool, args.out = args.seeds[:1], [0.05], 300, ""
    work = Path(args.work or tempfile.mkdtemp(prefix="unitrain-data-selection-"))
    os.environ.setdefault("UNITRAIN_CACHE", str(work / "cache"))
    print(f"work folder: {work}", flush=True)
    tasks = [t for t in load_tasks(args.pool) if t.name in args.tasks]
    tokenizer = train_tokenizer(work / "tokenizer", load_tasks(args.pool))
    done_file = work / "results.jsonl"
    done = [json.loads(line) for line in done_file.open()] if done_file.exists() else []
    t0 = time.perf_counter()
    cells, pools, reused = [], {}, 0
    for task in tasks:
        pools[task.name] = pool = scan_pool(task, tokenizer, work)
        print(f"{task.name}: pool {len(pool.records)} examples, {pool.tokens:,} tokens, fill {pool.fill:.2f}",
              flush=True)
        for seed in args.seeds:
            for frac in args.budgets:
                key = (task.name, frac, seed)
                cell = next((c for c in done if (c["task"], c["budget"], c["seed"]) == key), None)
                reused += cell is not None
                if cell is None:
                    cell = run_cell(task, tokenizer, pool, frac, seed, work)
                    with done_file.open("a") as f:
                        f.write(json.dumps(cell) + "\n")
                cells.append(cell)
                print(f"  budget {frac:.0%} seed {seed}: {cell['policy']}, {cell['steps']} steps, held-out loss "
                      f"selected {cell['selected']['heldout_loss']:.4f} vs random "
                      f"{cell['random']['heldout_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    command = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/data_selection.py " + \
        " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = report(cells, pools, command.strip(), time.perf_counter() - t0, reused)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
