"""The budget governor against training to the full budget, on real data (issue 5).

For each task, budget and seed two runs share everything (data, init, order) up to the stop: one to
the full budget (`stopping.enabled=false`), one with the governor. Reported per pair:
  saved      = 1 − governor run's FLOPs / budget          (the fraction of the budget not spent)
  saved/full = 1 − governor run's FLOPs / full run's FLOPs (what it saved against the actual baseline)
  Δloss      = (governor − full) / full, on held-out sequences the governor never saw (the eval
               batches after the ones it decides on), from each run's exported final/ model;
and per budget the mean and spread over seeds. Target (issue 5): ≥ 30 % saved at ≤ 1 % higher
held-out loss where the curve has flattened, and no stop in the steep phase.

Setup, sized for a shared 2-core CPU (one thread):
- A 1024-token byte-level BPE tokenizer trained here on the training text (with SmolLM2's 49k
  vocabulary the output layer would be ~95 % of a tiny model's compute), and a 0.5M-parameter Llama
  from a config (hidden 96, 3 layers).
- gsm8k-sft: supervised fine-tuning (loss on the answers) on a 96-example subset of GSM8K train,
  evaluated on GSM8K test. shakespeare-text: raw-text training on 80 paragraphs (~5.5k tokens) of tiny
  Shakespeare, evaluated on 600 held-out paragraphs.
- Budgets of 1.5, 5 and 20 epochs of that subset, in FLOPs: steps × FLOPs per step (the planner's
  compute model) + the evals' forward FLOPs. A tiny model trained from scratch on plenty of data
  follows a slow power law for far longer than a CPU can afford (measured while sizing this: no
  flattening within 1,500 steps), so the curve flattens here the way small fine-tuning sets do:
  repeated data stops paying. That is also why training.max_steps is set to the budget's steps:
  the planner would cap a budget-derived length at 4 epochs (EPOCH_CAP), and its budget-derived
  length ignores eval FLOPs, so a run with evals would hit the budget inside its planned cooldown.
- eval every max(2, steps // 40) steps on a fixed subset (the first 2–4 eval batches).

Run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/early_stopping.py
     (about 15 minutes on one CPU thread; --quick for a 2-minute smoke run)
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "early_stopping.md"
BUDGET_EPOCHS = (1.5, 5.0, 20.0)
MODEL = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 288, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 1024,
         "tie_word_embeddings": True}


@dataclass
class Task:
    name: str
    data: dict  # the recipe's data section (paths relative to DATA)
    seq_len: int
    batch: int  # global = micro batch: one forward per step
    eval_batches: int  # eval batches the governor sees; the held-out loss uses the ones after these
    heldout_sequences: int
    lr: float = 1e-2


TASKS = [
    Task("gsm8k-sft", {"train": "gsm8k/train.jsonl", "eval": "gsm8k/test.jsonl", "max_examples": 96},
         seq_len=256, batch=4, eval_batches=2, heldout_sequences=96),
    Task("shakespeare-text", {"train": "tinyshakespeare/input.txt", "format": "text", "eval_split": 600,
                              "max_examples": 80}, seq_len=64, batch=4, eval_batches=4, heldout_sequences=256),
]


@dataclass
class Pair:
    task: str
    budget_epochs: float
    seed: int
    steps: int
    eval_every: int
    budget_flops: float
    runs: dict = field(default_factory=dict)  # mode -> run summary


# ------------------------------------------------------------------------------------------- setup
def train_tokenizer(out: Path) -> Path:
    """A byte-level BPE with 1024 tokens on GSM8K train and tiny Shakespeare (seconds; cached in `out`)."""
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        yield from (DATA / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
        with open(DATA / "gsm8k" / "train.jsonl") as f:
            for line in f:
                row = json.loads(line)
                yield row["question"] + "\n" + row["answer"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=MODEL["vocab_size"],
                                                         special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return out


def recipe_dict(task: Task, tokenizer: Path, seed: int, steps: int, eval_every: int, budget: float | None,
                stopping: bool, out_dir: Path, name: str) -> dict:
    data = {k: (str(DATA / v) if k in ("train", "eval") else v) for k, v in task.data.items()}
    return {
        "name": name,
        "model": {"config": dict(MODEL), "tokenizer": str(tokenizer)},
        "data": data | {"max_length": task.seq_len, "select": False},
        "method": {"name": "full"},
        "training": {"lr": task.lr, "global_batch_size": task.batch, "micro_batch_size": task.batch,
                     "max_steps": steps, "eval_every": eval_every, "eval_max_batches": task.eval_batches,
                     # the governor's eval set is this benchmark's fixed one, not one sized to a few % of the budget
                     "eval_budget_share": 0.9,
                     "seed": seed, "gradient_checkpointing": "off", "kernels": "off", "log_every": 10_000},
        "resources": {"gpus_per_node": 0, **({"budget": f"{budget:.6e}"} if budget else {})},
        "stopping": {"enabled": stopping},
        "output": {"dir": str(out_dir), "save_every": 0, "keep_last": 1, "resume": "never", "overwrite": True},
        "tracking": {"progress": False},
    }


def size_budgets(task: Task, tokenizer: Path, seed: int, out_dir: Path) -> list[Pair]:
    """Steps, eval cadence and FLOPs budget per budget in epochs, from the planner's own numbers."""
    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.plan import make_plan
    from unitrain.recipe import validate

    r = validate(recipe_dict(task, tokenizer, seed, 1, 1, None, False, out_dir, "sizing"))
    tok = M.load_tokenizer(r.model)
    stats = pipeline.data_stats(pipeline.tokenize_data(r, tok), r, tok.pad_token_id)
    plan = make_plan(r, None, M.load_config(r.model), stats)
    eval_flops = plan.evals.flops  # one eval of the governor's eval batches: a forward over their slots
    pairs = []
    for epochs in BUDGET_EPOCHS:
        steps = max(1, round(epochs * stats.n_sequences / task.batch))
        every = max(2, steps // 40)
        n_evals = steps // every + 2  # step 0, every `every` steps, the final eval
        pairs.append(Pair(task.name, epochs, seed, steps, every, steps * plan.compute.flops_per_step + n_evals * eval_flops))
    return pairs


# ------------------------------------------------------------------------------------------- runs
def heldout_loss(run_dir: Path, recipe, task: Task) -> tuple[float, int]:
    """Token-mean loss of the exported model on the eval sequences after the governor's eval batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.data.tokenize import IGNORE

    tok = M.load_tokenizer(recipe.model)
    seqs = pipeline.finalize(pipeline.tokenize_data(recipe, tok), recipe, tok.pad_token_id).eval
    start = task.eval_batches * task.batch
    stop = min(len(seqs), start + task.heldout_sequences)
    if stop <= start:
        raise RuntimeError(f"{task.name}: only {len(seqs)} eval sequences; none left after the governor's")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(start, stop, task.batch):
            b = seqs.batch(list(range(s, min(stop, s + task.batch))))
            n = int((b["labels"][:, 1:] != IGNORE).sum())
            if n:
                out = model(**b, num_items_in_batch=torch.tensor(n))
                total, count = total + float(out.loss) * n, count + n
    return total / count, count


def run_one(pair: Pair, task: Task, tokenizer: Path, out_dir: Path, mode: str) -> dict:
    from rich.console import Console

    from unitrain.recipe import validate
    from unitrain.train.run import run_recipe

    name = f"{task.name}-b{pair.budget_epochs:g}-s{pair.seed}-{mode}"
    r = validate(recipe_dict(task, tokenizer, pair.seed, pair.steps, pair.eval_every, pair.budget_flops,
                             mode == "governor", out_dir, name))
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        res = run_recipe(r, console=Console(file=null))
    wall = time.perf_counter() - t0
    g = json.loads((res.run_dir / "governor.json").read_text())
    rep = g["report"]
    would_stop = [d["step"] for d in g["decisions"] if d["reason"] == "disabled"]
    held, tokens = heldout_loss(res.run_dir, r, task)
    return {"steps": res.steps, "stop_reason": res.stop_reason, "final_eval_loss": res.final_eval_loss,
            "heldout_loss": held, "heldout_tokens": tokens, "flops": rep["used"]["flops"],
            "fraction_of_budget": rep["fraction_of_budget"], "stop_step": (rep["stop"] or {}).get("step"),
            "stop_detail": (rep["stop"] or {}).get("detail"), "evals_at_stop": _evals_at_stop(g),
            "rule_would_stop_at": would_stop[0] if would_stop else None, "evals": len(g["evals"]),
            "wall_s": wall, "prediction": rep.get("prediction")}


def _evals_at_stop(g: dict) -> int | None:
    stop = g["report"]["stop"]
    return None if stop is None else sum(1 for e in g["evals"] if e[0] <= stop["step"])


# ------------------------------------------------------------------------------------------- report
def pair_metrics(p: Pair) -> dict | None:
    f, g = p.runs.get("full"), p.runs.get("governor")
    if not f or not g or "error" in f or "error" in g:
        return None
    return {"saved": 1 - g["flops"] / p.budget_flops, "saved_vs_full": 1 - g["flops"] / f["flops"],
            "dloss": (g["heldout_loss"] - f["heldout_loss"]) / f["heldout_loss"],
            "stopped": g["stop_reason"] in ("marginal_gain", "patience")}


PREMATURE = 0.01  # a governor stop that costs more than 1 % held-out loss stopped while gains were still steep


def spread(xs: list[float], pct: bool = True) -> str:
    k = 100 if pct else 1
    if not xs:
        return "–"
    m = statistics.fmean(xs) * k
    sd = statistics.stdev(xs) * k if len(xs) > 1 else 0.0
    lo, hi = min(xs) * k, max(xs) * k
    return f"{m:+.1f} ± {sd:.1f} [{lo:+.1f}, {hi:+.1f}]" if pct else f"{m:.3g} ± {sd:.2g}"


def prediction_lines(pairs: list[Pair]) -> list[str]:
    """Predicted vs achieved final eval loss, every run: the plan's prediction (from the learning curve an earlier
    run on the same task stored; none for a task's first run), and the governor's first and last refined ones.
    Coverage of the plan's prediction counts the full runs only: it predicts the loss at the end of the budget,
    which a run the governor stopped never reaches, and a governor run's plan reads the curve its own pair's full
    run just stored (the same run, so trivially right)."""
    rows, got = [], {"plan": [], "refined_first": [], "refined_last": []}

    def cell(p, kind, counted=True):
        if not p or p.get("loss") is None:
            return "–"
        if p.get("covered") is not None and counted:
            got[kind].append((p["covered"], p["high"] - p["low"], p["loss"]))
        return f"{p['loss']:.4f} [{p['low']:.4f}, {p['high']:.4f}]" + ("" if p.get("covered") is None else
                                                                       " ✓" if p["covered"] else " ✗")

    for pr in pairs:
        for mode in ("full", "governor"):
            r = pr.runs.get(mode) or {}
            pred = r.get("prediction")
            if not pred:
                continue
            rows.append(f"| {pr.task} | {pr.budget_epochs:g} | {pr.seed} | {mode} | {r['steps']} | "
                        f"{pred['achieved']:.4f} | {cell(pred['plan'], 'plan', mode == 'full')} | "
                        f"{cell(pred.get('refined_first'), 'refined_first')} | "
                        f"{cell(pred.get('refined_last'), 'refined_last')} |")
    if not rows:
        return []
    out = ["", "## Predicted against achieved final eval loss (80 % intervals)", "",
           "The plan's prediction comes from the learning curve stored by the task's previous run (same model, method, "
           "lr and data; another budget or seed), read at this run's effective tokens; its coverage counts the full "
           "runs (a governor run's plan reads the curve its own pair's full run just stored, and predicts a budget's "
           "end the stopped run never reaches). The refined ones come from the governor's fit at its first and its "
           "last decision, read at the step the run ended (every run counts).", ""]
    for kind, xs in got.items():
        if xs:
            out.append(f"- {kind}: {sum(c for c, _, _ in xs)}/{len(xs)} covered ({sum(c for c, _, _ in xs) / len(xs):.0%}"
                       f", nominal 80 %), mean width {statistics.fmean(w for _, w, _ in xs):.3f} nats "
                       f"({statistics.fmean(w / l for _, w, l in xs):.1%} of the loss)")
    return out + ["", "| task | epochs | seed | mode | steps | achieved | plan | first refined | last refined |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + rows


def report(pairs: list[Pair], command: str, wall: float) -> str:
    lines = ["# Early stopping: budget governor vs full budget", "", f"Command: `{command}`", "",
             f"Total wall time {wall / 60:.1f} min (one CPU thread on a shared machine). See the module docstring of "
             f"benchmarks/early_stopping.py for the setup. saved = 1 − governor FLOPs / budget; saved/full = "
             f"1 − governor FLOPs / full run's FLOPs; Δloss = (governor − full) / full on held-out sequences the "
             f"governor never evaluated; mean ± sd [min, max] over seeds.", "",
             "## Summary per budget", "",
             "| task | budget (epochs) | steps | eval every | stops (reason) | full run: rule would stop at | "
             "premature stops | saved % | saved/full % | Δloss % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for task in TASKS:
        for epochs in BUDGET_EPOCHS:
            ps = [p for p in pairs if p.task == task.name and p.budget_epochs == epochs]
            ms = [m for m in (pair_metrics(p) for p in ps) if m]
            if not ps:
                continue
            reasons = [p.runs.get("governor", {}).get("stop_reason", "error") for p in ps]
            would = [p.runs.get("full", {}).get("rule_would_stop_at") for p in ps]
            stopped = sum(m["stopped"] for m in ms)
            premature = sum(m["stopped"] and m["dloss"] > PREMATURE for m in ms)
            lines.append(f"| {task.name} | {epochs:g} | {ps[0].steps} | {ps[0].eval_every} | {stopped}/{len(ps)} "
                         f"({', '.join(reasons)}) | {', '.join('–' if w is None else str(w) for w in would)} | "
                         f"{premature}/{len(ps)} | "
                         f"{spread([m['saved'] for m in ms])} | {spread([m['saved_vs_full'] for m in ms])} | "
                         f"{spread([m['dloss'] for m in ms])} |")
            if ms:
                saved = statistics.fmean(m["saved_vs_full"] for m in ms)  # the stricter of the two
                dloss = statistics.fmean(m["dloss"] for m in ms)
                verdicts.append((task.name, epochs, stopped, premature, len(ms), saved, dloss))
    lines += ["", "## Against the target", ""]
    for name, epochs, stopped, premature, n, saved, dloss in verdicts:
        if epochs == min(BUDGET_EPOCHS):
            ok = stopped == 0
            lines.append(f"- {name}, {epochs:g} epochs (steep phase): {stopped}/{n} governor stops — "
                         f"{'meets' if ok else 'MISSES'} 'no stop in the steep phase'")
        else:
            ok = saved >= 0.30 and dloss <= 0.01
            lines.append(f"- {name}, {epochs:g} epochs: {stopped}/{n} stops ({premature} premature: Δloss > "
                         f"{PREMATURE:.0%}), mean saved/full {saved:.1%}, mean Δloss {dloss:+.2%} — "
                         f"{'meets' if ok else 'misses'} '≥ 30 % saved at ≤ 1 % higher loss'")
    stops = [(p, p.runs["governor"]) for p in pairs if p.runs.get("governor", {}).get("stop_detail")]
    if stops:
        lines += ["", "## Governor stops (the decision that stopped each run)", ""]
        for p, r in stops:
            lines.append(f"- {p.task}, {p.budget_epochs:g} epochs, seed {p.seed}: step {r['stop_step']} of "
                         f"{p.steps}, after {r['evals_at_stop']} evals — {r['stop_detail']}")
    lines += prediction_lines(pairs)
    lines += ["", "## Every run", "",
              "| task | epochs | seed | mode | steps | stop | rule would stop at | FLOPs | of budget | final eval | "
              "held-out loss | wall s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        for mode in ("full", "governor"):
            r = p.runs.get(mode)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {p.task} | {p.budget_epochs:g} | {p.seed} | {mode} | error: {r['error']} |"
                             + " |" * 7)
                continue
            lines.append(f"| {p.task} | {p.budget_epochs:g} | {p.seed} | {mode} | {r['steps']} | {r['stop_reason']}"
                         f"{'' if r['stop_step'] is None else ' @' + str(r['stop_step'])} | "
                         f"{r['rule_would_stop_at'] or '–'} | {r['flops']:.3g} | {r['fraction_of_budget']:.1%} | "
                         f"{r['final_eval_loss']:.4f} | {r['heldout_loss']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS])
    ap.add_argument("--work", default=None, help="scratch folder for the tokenizer and run directories")
    ap.add_argument("--out", default=str(RESULTS), help="markdown report ('' = print only)")
    ap.add_argument("--quick", action="store_true", help="1 seed, budgets / 10: a smoke run, not a result")
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
    global BUDGET_EPOCHS
    if args.quick:
        BUDGET_EPOCHS = tuple(e / 10 for e in BUDGET_EPOCHS[1:])
        args.seeds = args.seeds[:1]
    work = Path(args.work or tempfile.mkdtemp(prefix="unitrain-early-stopping-"))
    os.environ.setdefault("UNITRAIN_CACHE", str(work / "cache"))
    tokenizer = train_tokenizer(work / "tokenizer")
    print(f"work folder: {work}", flush=True)
    t0 = time.perf_counter()
    pairs: list[Pair] = []
    for task in (t for t in TASKS if t.name in args.tasks):
        for seed in args.seeds:
            for pair in size_budgets(task, tokenizer, seed, work / "runs"):
                pairs.append(pair)
                for mode in ("full", "governor"):
                    try:
                        pair.runs[mode] = run_one(pair, task, tokenizer, work / "runs", mode)
                    except Exception as e:  # one failed run is reported, not fatal to the table
                        pair.runs[mode] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    r = pair.runs[mode]
                    print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {task.name} epochs={pair.budget_epochs:g} "
                          f"seed={seed} {mode}: " + (r.get("error") or f"{r['steps']} steps, {r['stop_reason']}, "
                          f"held-out {r['heldout_loss']:.4f}, {r['fraction_of_budget']:.1%} of budget"), flush=True)
                (work / "pairs.json").write_text(json.dumps([vars(p) for p in pairs], indent=1))
    command = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/early_stopping.py" + \
        "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = report(pairs, command, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
