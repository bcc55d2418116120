"""Load training data (local files or hub datasets via `datasets`), split, tokenize (cached).

`load_examples` returns tokenized examples; selection (unitrain.data.select) and packing
(unitrain.data.pack) follow in unitrain.data.pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from unitrain.data.formats import detect_format, row_to_example
from unitrain.data.tokenize import TOKENIZE_VERSION, tokenize_example, tokenizer_fingerprint
from unitrain.errors import DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _quiet_datasets():
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def load_rows(source: str, split: str = "train", base_dir: str | None = None):
    """A `datasets.Dataset` of raw rows from a file, a folder of files, or a hub dataset name."""
    datasets = _quiet_datasets()
    if source.startswith("builtin:"):
        from unitrain.data.demo import materialize

        source = str(materialize(source.split(":", 1)[1], Path(default_cache_root())))
    path = Path(source).expanduser()
    if not path.exists() and base_dir and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"data file {path}: unsupported extension {path.suffix!r}; use "
                                f"{', '.join(_BUILDERS)} or a hub dataset name")
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _BUILDERS)
            if not files:
                raise DataError(f"data folder {path} holds no {', '.join(_BUILDERS)} files")
            builder = _BUILDERS[files[0].suffix.lower()]
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _BUILDERS:
            raise DataError(f"data file not found: {source}. Check the path (relative paths resolve against the "
                            f"working directory, then the recipe's folder)")
        return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; all mean "could not read this source"
        hint = (" (no network here? hub datasets need HF_HUB_OFFLINE unset and a reachable hub, or a local copy)"
                if not path.exists() else "")
        raise DataError(f"could not load data from {source!r}: {type(e).__name__}: {e}{hint}") from None


@dataclass
class TokenizedData:
    train: list[dict]  # tokenized examples: input_ids, labels, n_tokens, n_loss_tokens, truncated
    eval: list[dict]
    eval_examples: list  # formats.Example of the eval split (for generation-based metrics)
    train_records: list[dict]  # canonical {"prompt", "response", "id", "n_tokens"} for selection
    format: str
    skipped: dict  # reason -> count


def _cache_key(ds, fmt, cfg, tokenizer, use_template, role: str) -> str:
    payload = json.dumps([TOKENIZE_VERSION, ds._fingerprint, fmt, cfg.fields, cfg.max_length, cfg.system_prompt,
                          use_template, tokenizer_fingerprint(tokenizer), role])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _tokenize(ds, fmt, cfg, tokenizer, cache_dir: Path, role: str):
    """Tokenize with `datasets.map` into a cache file keyed by data, tokenizer and settings."""
    use_template = cfg.chat_template

    def fn(row, idx):
        ex = row_to_example(row, fmt, cfg.fields, cfg.system_prompt, idx)
        canon = ex.canonical()
        empty = not canon["response"].strip()
        out = tokenize_example(ex, tokenizer, cfg.max_length, use_template) if not empty else \
            {"input_ids": [], "labels": [], "n_tokens": 0, "n_loss_tokens": 0, "truncated": False}
        return {**out, "prompt": canon["prompt"], "response": canon["response"], "row": idx,
                "messages_json": json.dumps(ex.messages) if ex.messages else ""}

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(ds, fmt, cfg, tokenizer, use_template, role)
    cache_file = cache_dir / f"{key}.arrow"
    return ds.map(fn, with_indices=True, remove_columns=ds.column_names, cache_file_name=str(cache_file),
                  load_from_cache_file=True, desc=f"tokenize {role}")


def default_cache_root() -> str:
    return os.environ.get("UNITRAIN_CACHE", str(Path.home() / ".cache" / "unitrain"))


def default_cache_dir(cfg) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(default_cache_root()) / "tokenized"


def _split_rows(rows: list[dict], skipped: dict, fmt: str) -> tuple[list[dict], list[dict]]:
    """Drop (and count) rows that cannot train: empty, or no response token within max_length."""
    kept, canon = [], []
    for r in rows:
        if r["n_tokens"] == 0:
            skipped["empty"] = skipped.get("empty", 0) + 1
            continue
        if fmt != "text" and r["n_loss_tokens"] == 0:
            skipped["no_response_within_max_length"] = skipped.get("no_response_within_max_length", 0) + 1
            continue
        if r["truncated"]:
            skipped["truncated_kept"] = skipped.get("truncated_kept", 0) + 1
        kept.append(r)
        canon.append({"prompt": r["prompt"], "response": r["response"], "id": r["row"], "n_tokens": r["n_tokens"],
                      "truncated": r["truncated"]})
    return kept, canon


def load_examples(cfg, tokenizer, seed: int, base_dir: str | None = None) -> TokenizedData:
    """Rows -> format -> (train, eval) split -> tokenized examples, counting every skipped row."""
    from unitrain.data.formats import Example

    ds = load_rows(cfg.train, cfg.split, base_dir)
    if len(ds) == 0:
        raise DataError(f"data.train {cfg.train!r} holds no rows")
    fmt = detect_format(ds.column_names, cfg.fields, cfg.format)
    if cfg.eval:
        eval_ds = load_rows(cfg.eval, "test", base_dir)
        detect_format(eval_ds.column_names, cfg.fields, fmt)
        train_ds = ds.shuffle(seed=seed)
    elif cfg.eval_split > 0:
        n_eval = int(cfg.eval_split) if cfg.eval_split >= 1 else max(1, round(cfg.eval_split * len(ds)))
        if n_eval >= len(ds):
            raise DataError(f"data.eval_split={cfg.eval_split} leaves no training rows out of {len(ds)}; "
                            f"use a smaller fraction or provide data.eval")
        parts = ds.train_test_split(test_size=n_eval, seed=seed)
        train_ds, eval_ds = parts["train"], parts["test"]
    else:
        train_ds, eval_ds = ds.shuffle(seed=seed), None
    if cfg.max_examples:
        train_ds = train_ds.select(range(min(cfg.max_examples, len(train_ds))))
    cache = default_cache_dir(cfg)
    skipped: dict = {}
    train_rows, canon = _split_rows(list(_tokenize(train_ds, fmt, cfg, tokenizer, cache, "train")), skipped, fmt)
    eval_rows, eval_examples = [], []
    if eval_ds is not None and len(eval_ds):
        eval_skipped: dict = {}
        eval_rows, _ = _split_rows(list(_tokenize(eval_ds, fmt, cfg, tokenizer, cache, "eval")), eval_skipped, fmt)
        eval_examples = [Example(messages=json.loads(r["messages_json"])) if r["messages_json"] else
                         Example(text=r["response"]) for r in eval_rows]
        skipped.update({f"eval_{k}": v for k, v in eval_skipped.items()})
    if not train_rows:
        raise DataError(f"no training examples left after filtering {len(train_ds)} rows ({skipped}); check "
                        f"data.fields and data.max_length (={cfg.max_length})")
    return TokenizedData(train_rows, eval_rows, eval_examples, canon, fmt, skipped)
