"""Scale check for data selection: 100k examples through the cheap signals and the embeddings.

Builds N records from ../shared/data — GSM8K train (question/answer), ARC-Easy (question with its
choices / the gold choice), C4 demo documents (raw text) — and fills up to N with perturbed copies
drawn with a fixed seed, a third of each kind:
  format   case and whitespace changes            (exact duplicates after normalisation)
  edit     ~5% of the words dropped or repeated    (near duplicates, MinHash)
  numbers  every number replaced by another        (distinct token sequences, same template:
                                                    they survive MinHash and reach the embeddings)
plus 100 empty answers and 100 rows missing a field (counted skips). Then runs select_subset with a
budget of --budget-fraction of the raw tokens and prints wall time per stage and peak RSS.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/selection_scale.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_NUM = re.compile(r"\d+")


def base_records() -> list[dict]:
    if not DATA.exists():
        raise SystemExit(f"real data not found at {DATA} (the shared data folder ../shared/data is absent)")
    recs = [{"prompt": r["question"], "response": r["answer"]}
            for r in map(json.loads, (DATA / "gsm8k" / "train.jsonl").open())]
    recs += [{"prompt": r["query"] + "\n" + "\n".join(r["choices"]), "response": r["choices"][r["gold"]]}
             for r in map(json.loads, (DATA / "eval" / "arc_easy.jsonl").open())]
    recs += [{"prompt": "", "response": json.loads(line)["text"]} for line in (DATA / "pretrain" / "c4_demo.jsonl").open()]
    return recs


def perturb(text: str, kind: str, rng: np.random.Generator) -> str:
    if not text:
        return text
    if kind == "format":
        t = text.upper() if rng.random() < 0.3 else text
        return "  " + t.replace(" ", "  ").replace("\n", " \n") + " "
    if kind == "edit":
        words = text.split(" ")
        out = []
        for w in words:
            r = rng.random()
            if r < 0.025:
                continue  # drop
            out.append(w)
            if r > 0.975:
                out.append(w)  # repeat
        return " ".join(out)
    return _NUM.sub(lambda m: str(int(rng.integers(2, 10 ** len(m.group())))), text)


def build(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = base_records()
    recs = list(base)
    kinds = ("format", "edit", "numbers")
    while len(recs) < n - 200:
        src = base[int(rng.integers(len(base)))]
        kind = kinds[len(recs) % 3]
        recs.append({"prompt": perturb(src["prompt"], kind, rng), "response": perturb(src["response"], kind, rng),
                     "kind": kind})
    recs += [{"prompt": base[k]["prompt"], "response": "  ", "kind": "empty"} for k in range(100)]
    recs += [{"prompt": base[k]["prompt"], "kind": "missing"} for k in range(100)]
    order = rng.permutation(len(recs))
    return [recs[k] for k in order]


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--budget-fraction", type=float, default=0.15, help="budget as a fraction of the raw tokens")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from unitrain.data.select import select_subset

    t0 = time.perf_counter()
    recs = build(args.n, args.seed)
    raw_tokens = sum(len(r["prompt"] + "\n" + r.get("response", "")) // 4 for r in recs)
    print(f"built {len(recs):,} records ({raw_tokens:,} tokens ≈ chars/4) in {time.perf_counter() - t0:.1f} s; "
          f"RSS {rss_mb():.0f} MB; torch threads {torch.get_num_threads()}")
    print("kinds:", dict(Counter(r.get("kind", "original") for r in recs)))

    budget = int(args.budget_fraction * raw_tokens)
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    t0 = time.perf_counter()
    s = select_subset(recs, budget, seq_len=args.seq_len, seed=args.seed)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    d = s.details
    print(f"\nload average before/after: {load0} / {tuple(round(x, 2) for x in os.getloadavg())} (2 cores, shared)")
    print(f"select_subset: {wall:.1f} s wall, peak RSS {peak:.0f} MB (whole process, incl. torch and the records)")
    print("stage seconds:", json.dumps(d.get("seconds", {})))
    print(f"clean: {d['clean_examples']:,} examples, {d['clean_tokens']:,} tokens; budget {budget:,} tokens "
          f"(ρ = {d['budget_fraction']:.1%})")
    print("dropped by reason:", dict(Counter(x["why"] for x in s.dropped.values())))
    print("skipped:", s.skipped)
    enc = d.get("encoder", {})
    if enc:
        secs = d["seconds"].get("embed", float("nan"))
        print(f"embedded {enc['embedded']:,} texts (≤ {enc['max_tokens']} word pieces each) in {secs:.1f} s = "
              f"{enc['embedded'] / secs:.0f} texts/s; {enc['clusters']} clusters; "
              f"{enc['embedding_flops']:.3g} FLOPs; at this rate 100k distinct texts take "
              f"{100_000 / (enc['embedded'] / secs) / 60:.1f} min")
    cheap = sum(v for k, v in d["seconds"].items() if k not in ("embed", "cluster", "embedding_duplicates"))
    print(f"cheap signals (read, filters, exact, MinHash, prompt MinHash): {cheap:.1f} s for {len(recs):,} records")
    print(f"policy {s.policy}: kept {len(s.indices):,} examples, {s.tokens_kept:,} tokens, epochs {s.epochs}")
    print("reason:", s.reason)


if __name__ == "__main__":
    main()
