"""The data half of the flow: load -> tokenize -> clean (cached scan) -> stats for the planner -> subset -> pack.

Cleaning runs before planning, so the plan's unique-token count is the clean one; the selector afterwards only
ranks the clean pool and fills the tokens the plan decided (plan.data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from unitrain.data.load import TokenizedData, default_cache_dir, load_examples
from unitrain.data.pack import Sequences, pack_examples, pack_text
from unitrain.data.select import Cleaning, clean_pool
from unitrain.plan.schema import DataStats


@dataclass
class PreparedData:
    train: Sequences
    eval: Sequences | None
    eval_examples: list
    format: str
    stats: DataStats
    skipped: dict
    subset: dict = field(default_factory=dict)  # the selection outcome (policy, reason, kept/dropped counts)


def pack(examples: list[dict], fmt: str, seq_len: int, pad_id: int, packing: bool) -> Sequences:
    return pack_text(examples, seq_len, pad_id) if fmt == "text" else \
        pack_examples(examples, seq_len, pad_id, packing)


def tokenize_data(recipe, tokenizer) -> TokenizedData:
    return load_examples(recipe.data, tokenizer, recipe.training.seed, recipe.base_dir)


def clean(tok: TokenizedData, recipe) -> Cleaning:
    """Filters and exact/near duplicates over the training records, cached beside the tokenization cache
    (data.clean=false keeps every row that can train)."""
    return clean_pool(tok.train_records, seq_len=recipe.data.max_length, filters=recipe.data.clean,
                      cache_dir=default_cache_dir(recipe.data).parent / "cleaning")


def data_stats(tok: TokenizedData, recipe, pad_id: int, cleaning: Cleaning | None = None) -> DataStats:
    """What the planner needs, over the clean pool when `cleaning` is given (else the raw examples)."""
    d = recipe.data
    rows = tok.train if cleaning is None else [tok.train[i] for i in cleaning.clean]
    seqs = pack(rows, tok.format, d.max_length, pad_id, d.packing)
    ev = pack(tok.eval, tok.format, d.max_length, pad_id, d.packing) if tok.eval else None
    dropped: dict = {}
    for v in (cleaning.dropped.values() if cleaning is not None else ()):
        dropped[v["why"]] = dropped.get(v["why"], 0) + 1
    # the data a learning curve belongs to: the clean pool (its token ids) and the eval split
    h = hashlib.blake2b(f"{tok.format}|{d.max_length}|{d.packing}".encode(), digest_size=12)
    for r in rows:
        h.update(hashlib.blake2b(bytes(str(r["input_ids"]), "ascii"), digest_size=8).digest())
    h.update(b"|eval|")
    for r in tok.eval:
        h.update(hashlib.blake2b(bytes(str(r["input_ids"]), "ascii"), digest_size=8).digest())
    return DataStats(n_examples=len(rows), total_tokens=sum(r["n_tokens"] for r in rows), n_sequences=len(seqs),
                     seq_len=d.max_length, supervised_tokens=sum(r["n_loss_tokens"] for r in rows),
                     eval_tokens=sum(r["n_tokens"] for r in tok.eval),
                     train_lengths=seqs.lengths.tolist(), eval_lengths=ev.lengths.tolist() if ev is not None else [],
                     cleaned=cleaning is not None, raw_examples=len(tok.train),
                     raw_tokens=sum(r["n_tokens"] for r in tok.train), dropped=dropped, fingerprint=h.hexdigest())


def finalize(tok: TokenizedData, recipe, pad_id: int, keep: list[int] | None = None,
             subset: dict | None = None) -> PreparedData:
    """Pack the kept training examples (all when `keep` is None) and the eval split."""
    d = recipe.data
    train_rows = tok.train if keep is None else [tok.train[i] for i in keep]
    train = pack(train_rows, tok.format, d.max_length, pad_id, d.packing)
    ev = pack(tok.eval, tok.format, d.max_length, pad_id, d.packing) if tok.eval else None
    stats = DataStats(n_examples=len(train_rows), total_tokens=sum(r["n_tokens"] for r in train_rows),
                      n_sequences=len(train), seq_len=d.max_length,
                      supervised_tokens=sum(r["n_loss_tokens"] for r in train_rows),
                      eval_tokens=ev.n_tokens if ev is not None else 0)
    return PreparedData(train, ev if ev is not None and len(ev) else None, tok.eval_examples, tok.format, stats,
                        tok.skipped, subset or {})
