"""The data half of the flow: load -> tokenize -> stats for the planner -> subset -> pack."""

from __future__ import annotations

from dataclasses import dataclass, field

from unitrain.data.load import TokenizedData, load_examples
from unitrain.data.pack import Sequences, pack_examples, pack_text
from unitrain.plan.schema import DataStats


@dataclass
class PreparedData:
    train: Sequences
    eval: Sequences | None
    eval_examples: list
    format: str
    stats: DataStats
    skipped: dict
    subset: dict = field(default_factory=dict)  # the selection decision (policy, reason, kept/dropped counts)


def pack(examples: list[dict], fmt: str, seq_len: int, pad_id: int, packing: bool) -> Sequences:
    return pack_text(examples, seq_len, pad_id) if fmt == "text" else \
        pack_examples(examples, seq_len, pad_id, packing)


def tokenize_data(recipe, tokenizer) -> TokenizedData:
    return load_examples(recipe.data, tokenizer, recipe.training.seed, recipe.base_dir)


def data_stats(tok: TokenizedData, recipe, pad_id: int) -> DataStats:
    d = recipe.data
    seqs = pack(tok.train, tok.format, d.max_length, pad_id, d.packing)
    return DataStats(n_examples=len(tok.train), total_tokens=sum(r["n_tokens"] for r in tok.train),
                     n_sequences=len(seqs), seq_len=d.max_length,
                     supervised_tokens=sum(r["n_loss_tokens"] for r in tok.train),
                     eval_tokens=sum(r["n_tokens"] for r in tok.eval))


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
