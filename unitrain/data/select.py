"""Budget-aware data selection: which examples fill the tokens the budget affords.

Cheap signals first, in this order; each example gets the first reason that removes it:
  1. bad rows — missing/non-text fields, invalid UTF-8: counted in `skipped` and listed in `dropped`;
  2. format filters — `empty`, `too_long` (supervised, > seq_len), `truncated_answer` (score.py);
  3. `exact_duplicate` (normalised hash) and `near_duplicate` (MinHash, shingle Jaccard ≥ 0.8 of
     the whole example) — the later copy goes, its report names the kept one.
What survives is the *clean* data, T_clean tokens: `clean_pool` does this part alone, as a pure scan cached
by content (the planner sizes the run on the clean count). The planner then decides how many tokens the run
trains on and how many the subset holds (plan.data.subset_tokens, epochs included); the selector only ranks
and fills that many tokens. With a token budget B:

- **keep_all** (B ≥ T_clean, or no budget): every clean example; the plan repeats them as often as it decided.
- **select** (B < T_clean: data is abundant), fraction ρ = B / T_clean:
  * soft redundancy goes last: the same question asked again (prompt Jaccard ≥ 0.8 with a
    different answer; a prompt shared by ≥ 5 examples is a template and exempt) and semantic
    duplicates (embedding cosine ≥ 0.95 within a k-means cluster). They are kept while data is
    scarce — they carry distinct tokens — and only fill the budget after everything else;
  * diversity: examples are clustered (k-means on sentence embeddings, √n clusters) and every
    cluster contributes in proportion to its tokens (stratified, so no topic is lost by chance).
    Embedding costs ∝ what is embedded, so when 4·B < T_clean only a random candidate set of 4·B
    tokens is embedded (the selector's cost follows the budget, not the pool);
  * difficulty: the prototype distance (cosine to the cluster centroid, Sorscher et al. 2022), or
    the model's IFD/loss when those pay (below). Following Sorscher et al. and CADS, a small
    budget (ρ < HARD_SWITCH) keeps the easiest examples of each cluster (**select_clean_easy_diverse**);
    a large one keeps the hardest, minus the 2% most atypical of each cluster, likely noise
    (**select_with_hard**). Without embeddings or model scores: **select_clean_random**.
  * model signals (loss, IFD) are bought only when they cost ≤ 10% of the FLOP budget (see
    score.model_signals_pay: with the trained model as scorer they never do, Yin & Rush 2024).
    Then ≤ 2·B tokens of candidates are drawn by cheap signals and scored. Every selector FLOP
    (embedding + scoring) is reported in `selector_flops` and charged to the run's budget.

Deterministic for a seed (k-means init, tie-breaks and the training order all come from it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from unitrain.data import dedup, score
from unitrain.errors import DataError

HARD_SWITCH = 0.25  # ρ at which the policy turns from easy-first to hard-first
NEAR_DUP_JACCARD = 0.8
EMBED_DUP_COSINE = 0.95
TEMPLATE_MIN = 5  # a prompt shared by this many examples is a template, not a repeated question
OUTLIER_SHARE = 0.02  # hardest share of each cluster treated as likely noise in hard-first mode
EMBED_CANDIDATE_FACTOR = 4.0  # embed at most 4× the tokens the budget keeps (a random candidate set)


@dataclass
class Selection:
    indices: list[int]  # kept record indices, in training order (a seeded shuffle)
    policy: str
    reason: str
    # index -> {"why", "of": the kept index it duplicates or None, "score"}; score is the Jaccard
    # (near_duplicate, plus "on": "text" | "prompt"), cosine (embedding_duplicate), token count
    # (too_long) or difficulty (not_selected: prototype distance, IFD or loss), else None
    dropped: dict[int, dict]
    tokens_kept: int  # tokens of one pass over `indices`
    scores: dict[str, list[float]]  # per-record signals aligned with the records (nan = not computed)
    skipped: dict[str, int]  # bad rows by kind
    selector_flops: float
    details: dict = field(default_factory=dict)  # the numbers behind the decision
    records: list = field(default=None, repr=False, compare=False)

    def report(self) -> dict:
        dist = {}
        for k, v in self.scores.items():
            a = np.asarray(v, dtype=np.float64)
            a = a[np.isfinite(a)]
            if len(a):
                q = np.quantile(a, [0, 0.1, 0.5, 0.9, 1])
                dist[k] = {"n": int(len(a)), "mean": float(a.mean()), "min": float(q[0]), "p10": float(q[1]),
                           "p50": float(q[2]), "p90": float(q[3]), "max": float(q[4])}
        return {"policy": self.policy, "reason": self.reason,
                "n_records": self.details.get("n_records"), "n_kept": len(self.indices),
                "tokens_kept": self.tokens_kept, "dropped_by_reason": dict(Counter(d["why"] for d in self.dropped.values())),
                "skipped": dict(self.skipped), "selector_flops": self.selector_flops, "details": self.details,
                "score_distributions": dist}

    def write(self, out_path: str | Path, rows=None) -> Path:
        """The subset as jsonl, in training order, and `<out>.report.json` (its "kept" lists each written line's
        record index and tokens). With `rows` (the rows as read, indexed by a record's "id": TokenizedData's
        train_source) each line is the original row, every column as it was, so the file trains as `data.train`
        as it is; without, the canonical record plus its "index"."""
        if self.records is None:
            raise DataError("this Selection carries no records to write; call select_subset(...) to get one")
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for i in self.indices:
                row = {**self.records[i], "index": i} if rows is None else rows[int(self.records[i]["id"])]
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        rep = out.with_suffix(".report.json")
        full = self.report()
        full["kept"] = [{"index": i, "n_tokens": self.records[i].get("n_tokens")} for i in self.indices]
        full["dropped"] = {str(i): d for i, d in sorted(self.dropped.items())}
        rep.write_text(json.dumps(full, indent=1, default=float))
        return rep


def random_subset(records: list[dict], n_tokens: int, *, seed: int) -> list[int]:
    """The baseline: a uniformly random subset of all records with ~n_tokens tokens (no cleaning)."""
    rows, _ = score.read_rows(records)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[k].index for k in _fill(order, [r.n_tokens for r in rows], n_tokens)]


def _fill(order, tokens, budget: int) -> list[int]:
    """Take positions in `order` until the budget; the last one only if it lands closer to it."""
    taken, total = [], 0
    for k in order:
        t = tokens[k]
        if total + t > budget:
            if budget - total > total + t - budget:
                taken.append(k)
            break
        taken.append(k)
        total += t
    return taken


def _within_rank(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Percentile rank (0 = lowest) of each value inside its cluster."""
    rank = np.zeros(len(values))
    for c in np.unique(labels):
        m = np.flatnonzero(labels == c)
        rank[m] = np.argsort(np.argsort(values[m], kind="stable"), kind="stable") / max(1, len(m) - 1)
    return rank


def _stratified_order(tokens: np.ndarray, labels: np.ndarray, priority: np.ndarray, tier: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Positions ordered by (tier, share of its cluster's tokens already taken before it).

    Inside a cluster examples come in `priority` order (low first); sorting by the cumulative
    token share makes every cluster advance through its tokens at the same rate, so any prefix is
    a proportional, stratified sample.
    """
    share = np.zeros(len(tokens))
    for c in np.unique(labels):
        m = np.flatnonzero(labels == c)
        m = m[np.lexsort((priority[m], tier[m]))]
        share[m] = (np.cumsum(tokens[m]) - tokens[m]) / tokens[m].sum()
    return np.lexsort((rng.random(len(tokens)), share, tier))


CLEAN_VERSION = 1  # bump when clean_pool's output changes: invalidates cached scans


@dataclass
class Cleaning:
    """The cheap-signal scan: which records survive, and why every other one does not."""

    clean: list[int]  # surviving record indices, in record order
    dropped: dict[int, dict]  # index -> {"why", "of", "score"[, "on"]}
    skipped: dict[str, int]  # bad rows by kind
    tokens: int  # real tokens of the clean records
    details: dict = field(default_factory=dict)


def _scan_key(records: list[dict], seq_len: int, filters: bool) -> str:
    h = hashlib.blake2b(f"{CLEAN_VERSION}|{seq_len}|{filters}|{len(records)}".encode(), digest_size=16)
    for r in records:
        fields = [r.get(k) for k in ("prompt", "response", "n_tokens", "truncated")] if isinstance(r, dict) else [r]
        h.update(hashlib.blake2b(json.dumps(fields, default=repr).encode("utf-8", "surrogatepass"),
                                 digest_size=8).digest())
    return h.hexdigest()


def clean_pool(records: list[dict], *, seq_len: int, filters: bool = True,
               cache_dir: str | Path | None = None) -> Cleaning:
    """Bad rows, format filters, exact and near duplicates (module doc, steps 1-3): a pure function of the
    records and seq_len, cached as JSON in `cache_dir` (keyed by their content) so a run's planning and its
    relaunches scan once. `filters=False` drops only the rows that cannot train (step 1)."""
    key = _scan_key(records, seq_len, filters)
    cache = Path(cache_dir).expanduser() / f"clean-{key}.json" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            d = json.loads(cache.read_text())
            return Cleaning(d["clean"], {int(k): v for k, v in d["dropped"].items()}, d["skipped"], d["tokens"],
                            d["details"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged cache entry: scan again
    details: dict = {"n_records": len(records), "seq_len": seq_len}
    with _timed(details, "read_and_filter"):
        rows, bad = score.read_rows(records)
        dropped: dict[int, dict] = {i: {"why": why, "of": None, "score": None} for i, why in bad.items()}
        skipped = dict(Counter(bad.values()))
        rule = score.truncation_rule(rows) if filters else ("none", None)
        details["truncation_rule"] = {"kind": rule[0], "marker": rule[1]}
        survivors = []
        for r in rows:
            why = score.format_filter(r, seq_len=seq_len, rule=rule) if filters else None
            if why:
                dropped[r.index] = {"why": why, "of": None, "score": float(r.n_tokens) if why == "too_long" else None}
            else:
                survivors.append(r)
    with _timed(details, "exact_duplicates"):
        exact = dedup.exact_duplicates((r.index, r.text) for r in survivors) if filters else {}
    for i, j in exact.items():
        dropped[i] = {"why": "exact_duplicate", "of": j, "score": 1.0}
    survivors = [r for r in survivors if r.index not in exact]
    with _timed(details, "near_duplicates"):
        near = dedup.near_duplicates(((r.index, r.text) for r in survivors), threshold=NEAR_DUP_JACCARD) \
            if filters else {}
    for i, (j, jac) in near.items():
        dropped[i] = {"why": "near_duplicate", "of": j, "score": round(jac, 4), "on": "text"}
    clean = [r for r in survivors if r.index not in near]
    out = Cleaning([r.index for r in clean], dropped, skipped, sum(r.n_tokens for r in clean), details)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"clean": out.clean, "dropped": {str(k): v for k, v in dropped.items()},
                                   "skipped": skipped, "tokens": out.tokens, "details": details}))
        tmp.replace(cache)  # complete or absent
    return out


def select_subset(records: list[dict], token_budget: int | None, *, seq_len: int, seed: int,
                  encoder: str | None = "default", model_scorer: Callable | None = None,
                  scorer_flops_per_token: float | None = None, budget_flops: float | None = None,
                  batch_size: int = 1, embed_max_tokens: int | None = None,
                  cache_dir: str | Path | None = None, cleaning: Cleaning | None = None) -> Selection:
    """Fill `token_budget` tokens (one pass) with the best-ranked clean examples (see the module docstring).

    `cleaning`: a `clean_pool` result for these records (scanned once before planning); computed when None.
    `batch_size`: sequences per optimizer step; fewer usable examples than that is an error.
    `cache_dir`: where embeddings are cached (keyed by encoder and texts), None = no cache.
    """
    if cleaning is None:
        cleaning = clean_pool(records, seq_len=seq_len)
    details: dict = {**cleaning.details, "token_budget": token_budget, "seed": seed}
    dropped = {i: dict(d) for i, d in cleaning.dropped.items()}
    skipped = dict(cleaning.skipped)
    rows, _ = score.read_rows(records)
    by_index = {r.index: r for r in rows}
    n = len(records)
    tokens_of = {r.index: r.n_tokens for r in rows}
    scores = {"n_tokens": [float(tokens_of.get(i, math.nan)) for i in range(n)]}
    usable = len(rows)
    if usable < max(1, batch_size):
        raise DataError(f"data selection: only {usable} usable example(s) of {len(records)} "
                        f"({skipped or 'none'} skipped), fewer than one batch of {batch_size}. Add data or "
                        f"lower training.global_batch_size.")
    clean = [by_index[i] for i in cleaning.clean]
    if len(clean) < max(1, batch_size):
        raise DataError(f"data selection: {len(clean)} clean example(s) remain of {len(records)} after removing "
                        f"{dict(Counter(d['why'] for d in dropped.values()))}, fewer than one batch of {batch_size}. "
                        f"Add data, raise data.max_length, or lower training.global_batch_size.")
    t_clean = cleaning.tokens
    details.update(clean_examples=len(clean), clean_tokens=t_clean)
    rng = np.random.default_rng(seed)

    def done(kept: list[int], policy: str, reason: str, flops: float = 0.0) -> Selection:
        kept = [kept[k] for k in rng.permutation(len(kept))]
        return Selection(kept, policy, reason, dropped, sum(tokens_of[i] for i in kept), scores, skipped, flops,
                         details, records)

    if token_budget is None or token_budget >= t_clean:
        why = "no token budget" if token_budget is None else \
            f"the budget of {token_budget:,} tokens covers the clean data ({t_clean:,} tokens)"
        return done([r.index for r in clean], "keep_all", f"{why}: all {len(clean):,} clean examples")
    return _select(records, clean, token_budget, t_clean, rng, done, dropped, scores, details, seed=seed,
                   batch_size=batch_size,
                   encoder=encoder, embed_max_tokens=embed_max_tokens, cache_dir=cache_dir, model_scorer=model_scorer,
                   scorer_flops_per_token=scorer_flops_per_token, budget_flops=budget_flops)


def _prompt_duplicates(clean: list[score.Row]) -> dict[int, tuple[int, float]]:
    """The same question asked again with another answer; template prompts (≥ TEMPLATE_MIN uses) are exempt."""
    sup = [r for r in clean if r.supervised]
    dups = dedup.near_duplicates(((r.index, r.prompt) for r in sup), threshold=NEAR_DUP_JACCARD)
    group = Counter(j for j, _ in dups.values())
    return {i: (j, s) for i, (j, s) in dups.items() if group[j] + 1 < TEMPLATE_MIN}


def embed_text(r: score.Row, max_tokens: int) -> str:
    """Head and tail of the example (~4 characters per token): the start names the topic, the end the ask."""
    t, half = r.text, 2 * max_tokens
    return t if len(t) <= 2 * half else f"{t[:half]} … {t[-half:]}"


def _select(records, clean, budget, t_clean, rng, done, dropped, scores, details, *, seed, batch_size, encoder,
            embed_max_tokens, cache_dir, model_scorer, scorer_flops_per_token, budget_flops) -> Selection:
    from unitrain.data import embed as emb_mod

    n, m = len(records), len(clean)
    rho = budget / t_clean
    idx = np.array([r.index for r in clean])
    tok = np.array([r.n_tokens for r in clean], dtype=np.float64)
    notes, flops = [], 0.0
    with _timed(details, "prompt_duplicates"):
        redundant = {i: {"why": "near_duplicate", "of": j, "score": round(s, 4), "on": "prompt"}
                     for i, (j, s) in _prompt_duplicates(clean).items()}
    tier = np.array([1 if i in redundant else 0 for i in idx])
    pool = np.arange(m)  # positions in `clean` that may be selected
    labels = np.zeros(m, dtype=np.int64)
    difficulty = None
    if encoder is None:
        notes.append("embeddings skipped (encoder=None): no semantic dedup, clusters or prototype difficulty")
    else:
        enc = emb_mod.load_encoder(encoder, max_tokens=embed_max_tokens or emb_mod.DEFAULT_MAX_TOKENS)
        if EMBED_CANDIDATE_FACTOR * budget < t_clean:  # embed a random candidate set, not the whole pool
            pool = np.sort(np.array(_fill(np.lexsort((rng.random(m), tier)), tok, int(EMBED_CANDIDATE_FACTOR * budget))))
        est = enc.flops_per_token * sum(min(clean[p].n_tokens, enc.max_tokens) for p in pool)
        if budget_flops is not None and est > score.MODEL_SIGNAL_MAX_SHARE * budget_flops:
            pool = np.arange(m)
            notes.append(f"embeddings skipped: ≈{est:.3g} FLOPs > {score.MODEL_SIGNAL_MAX_SHARE:.0%} of the budget")
        else:
            with _timed(details, "embed"):
                e, f = emb_mod.embed_texts([embed_text(clean[p], enc.max_tokens) for p in pool], enc,
                                           cache_dir=cache_dir)
            flops += f
            k = dedup.default_n_clusters(len(pool))
            with _timed(details, "cluster"):
                lab, dist = dedup.cluster(e, n_clusters=k, seed=seed)
            with _timed(details, "embedding_duplicates"):
                for row, (j, cos) in dedup.embedding_duplicates(e, lab, threshold=EMBED_DUP_COSINE).items():
                    redundant.setdefault(int(idx[pool[row]]), {"why": "embedding_duplicate",
                                                               "of": int(idx[pool[j]]), "score": round(cos, 4)})
            del e
            tier = np.array([1 if i in redundant else 0 for i in idx])
            labels[pool] = lab
            difficulty = np.full(m, math.nan)
            difficulty[pool] = dist
            proto = np.full(n, math.nan)
            proto[idx[pool]] = dist
            scores["prototype_distance"] = proto.tolist()
            details["encoder"] = {"name": enc.name, "source": enc.source, "max_tokens": enc.max_tokens,
                                  "embedded": int(len(pool)), "clusters": k, "embedding_flops": f}

    if model_scorer is not None:
        cand_order = pool[_stratified_order(tok[pool], labels[pool], rng.random(len(pool)), tier[pool], rng)]
        cand = np.sort(cand_order[_fill(range(len(cand_order)), tok[cand_order],
                                         int(score.CANDIDATE_FACTOR * budget))])
        ifd = any(clean[c].supervised for c in cand)
        use, cost, why = score.model_signals_pay(candidate_tokens=int(tok[cand].sum()), ifd=ifd,
                                                 scorer_flops_per_token=scorer_flops_per_token,
                                                 budget_flops=budget_flops)
        notes.append(why)
        details["model_signals"] = {"used": use, "flops": cost, "candidates": int(len(cand))}
        if use:
            with _timed(details, "model_scorer"):
                got = score.run_model_scorer(model_scorer, records, [int(idx[c]) for c in cand])
            flops += cost
            loss, ifds = np.full(n, math.nan), np.full(n, math.nan)
            for i, (lq, v) in got.items():
                loss[i], ifds[i] = lq, (v if v is not None else math.nan)
            scores["loss"], scores["ifd"] = loss.tolist(), ifds.tolist()
            signal = ifds[idx] if np.isfinite(ifds[idx[cand]]).any() else loss[idx]
            pool = cand[np.isfinite(signal[cand])]
            difficulty = signal

    if flops:
        notes.append(f"selector FLOPs {flops:.3g}, charged to the run's budget")
    priority = np.zeros(m)
    if difficulty is None:
        policy, priority = "select_clean_random", rng.random(m)
    else:
        rank = np.full(m, math.nan)
        rank[pool] = _within_rank(difficulty[pool], labels[pool])
        if rho < HARD_SWITCH:
            policy, priority[pool] = "select_clean_easy_diverse", rank[pool]
        else:  # hardest first, the most atypical OUTLIER_SHARE of each cluster last
            policy = "select_with_hard"
            priority[pool] = np.where(rank[pool] > 1 - OUTLIER_SHARE, 1 + rank[pool], 1 - rank[pool])
        ranks = np.full(n, math.nan)
        ranks[idx] = rank
        scores["difficulty_rank"] = ranks.tolist()
    order = pool[_stratified_order(tok[pool], labels[pool], priority[pool], tier[pool], rng)]
    n_fit = len(_fill(range(len(order)), tok[order], budget))  # _fill takes a prefix of the order
    if n_fit < min(batch_size, len(order)):
        n_fit = min(batch_size, len(order))
        notes.append(f"the budget holds less than one batch; kept one batch ({n_fit} examples)")
    take = set(order[:n_fit].tolist())
    kept = [int(idx[p]) for p in sorted(take)]
    for p in range(m):
        if p not in take:
            d = None if difficulty is None or not np.isfinite(difficulty[p]) else round(float(difficulty[p]), 5)
            dropped[int(idx[p])] = redundant.get(int(idx[p])) or {"why": "not_selected", "of": None, "score": d}
    details.update(budget_fraction=rho, redundant=len(redundant), hard_switch=HARD_SWITCH, notes=notes)
    reason = (f"data is abundant: budget {budget:,} tokens < clean data {t_clean:,} tokens (ρ = {rho:.1%}); "
              + {"select_clean_random": "no difficulty signal, random clean examples",
                 "select_clean_easy_diverse": f"ρ < {HARD_SWITCH:.0%}: easiest of every cluster, stratified",
                 "select_with_hard": f"ρ ≥ {HARD_SWITCH:.0%}: hardest of every cluster, stratified, minus "
                                     f"the {OUTLIER_SHARE:.0%} most atypical"}[policy]
              + (f"; {len(redundant):,} redundant examples go last" if redundant else "")
              + "".join(f"; {x}" for x in notes))
    return done(kept, policy, reason, flops)


@contextlib.contextmanager
def _timed(details: dict, stage: str):
    t0 = time.perf_counter()
    yield
    details.setdefault("seconds", {})[stage] = round(time.perf_counter() - t0, 3)
