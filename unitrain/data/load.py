"""Load training data (local files or hub datasets via `datasets`), split, tokenize (cached).

`load_examples` returns tokenized examples; selection (unitrain.data.select) and packing
(unitrain.data.pack) follow in unitrain.data.pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from unitrain.data.formats import FORMAT_KEYS, detect_format, resolve_fields, row_to_example
from unitrain.data.tokenize import TOKENIZE_VERSION, tokenize_example, tokenizer_fingerprint
from unitrain.errors import DataError

log = logging.getLogger("unitrain")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _quiet_datasets():
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def load_rows(source: str, split: str = "train", base_dir: str | None = None, bad_rows: str = "error",
              key: str = "data.train"):
    """A `datasets.Dataset` of raw rows from a file, a folder of files, or a hub dataset name."""
    return _load(source, split, base_dir, bad_rows, key)[0]


@dataclass
class RowOrigin:
    """Where row i of a loaded dataset came from, to name bad rows by file and line."""

    files: list  # [(path, the original line number of each row | "lines" (count them when asked) | None)]
    skipped_lines: int = 0  # lines dropped before loading (data.bad_rows=skip): not valid JSON objects

    def describe(self, rows: list[int], limit: int = 12) -> str:
        named, offset = [], 0
        for path, lines in self.files:
            if lines == "lines":  # read the file only when there is something to report
                lines = _row_lines(Path(path))
            n = len(lines) if lines is not None else None
            here = [i - offset for i in rows if n is None or offset <= i < offset + n]
            if lines is not None and here:
                named.append(f"{Path(path).name} line{'s' if len(here) > 1 else ''} "
                             + ", ".join(str(lines[j]) for j in here[:limit]) + (" ..." if len(here) > limit else ""))
            elif here:  # not line-based (or an unknown row count): 1-based row numbers
                named.append(f"row{'s' if len(here) > 1 else ''} " + ", ".join(str(j + 1) for j in here[:limit])
                             + (" ..." if len(here) > limit else ""))
                break
            offset += n or 0
        return "; ".join(named)


def _json_lines(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open("rb") as f:
        return path.suffix.lower() == ".json" and f.read(4096).lstrip()[:1] != b"["


def _row_lines(path: Path) -> list[int]:
    with path.open(encoding="utf-8", errors="replace") as f:
        return [i for i, line in enumerate(f, 1) if line.strip()]


def _check_text_file(path: Path, key: str) -> None:
    """An empty or binary file, named before datasets reads it (it says StopIteration, or an internal error)."""
    if path.suffix.lower() == ".parquet":
        return
    with path.open("rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise DataError(f"{key}: data file {path} is empty ({path.stat().st_size} bytes); give a file with one "
                        f"example per line (.jsonl) or per paragraph (.txt)")
    try:
        head.decode("utf-8")
        text = True
    except UnicodeDecodeError as e:
        text = e.start >= len(head) - 3  # a character cut by our 8 KiB window is fine
    nul = b"\0" in head
    if nul or not text:
        raise DataError(f"{key}: data file {path} is not text ({'it holds NUL bytes' if nul else 'not UTF-8'}: a "
                        f"binary file?); .json/.jsonl/.csv/.txt data must be UTF-8 text (.parquet for binary tables)")


def _bad_json_lines(path: Path) -> list[tuple[int, str]]:
    bad = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                bad.append((i, getattr(e, "msg", str(e))))
                continue
            if not isinstance(obj, dict):
                bad.append((i, f"a JSON {type(obj).__name__}, not an object"))
    return bad


def _without_lines(path: Path, bad: set[int]) -> tuple[Path, list[int]]:
    """A copy of `path` without the `bad` lines, in the cache (same input -> same file -> same tokenization cache)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{sorted(bad)}".encode()).hexdigest()[:16]
    out = Path(default_cache_root()) / "clean" / f"{path.stem}-{key}.jsonl"
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip() and i not in bad]
    kept = [i for i, _ in lines]
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for _, line in lines))
        tmp.replace(out)
    return out, kept


def _listing(bad: list[tuple[int, str]], limit: int = 12) -> str:
    return ", ".join(f"line {i} ({why})" for i, why in bad[:limit]) + (" ..." if len(bad) > limit else "")


def _load_files(datasets, files: list[Path], bad_rows: str, key: str, single: bool):
    for f in files:
        _check_text_file(f, key)
    builder = _BUILDERS[files[0].suffix.lower()]
    kwargs = {"sample_by": "paragraph"} if builder == "text" and single else {}
    origin = RowOrigin([(f, "lines" if builder == "json" and _json_lines(f) else None) for f in files])
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # a parse failure is reported once, below, by line
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs), origin
    except Exception:
        if builder != "json":
            raise
        broken = {f: _bad_json_lines(f) for f in files if _json_lines(f)}
        broken = {f: b for f, b in broken.items() if b}
        if not broken:
            raise
    finally:
        datasets.utils.logging.set_verbosity(level)
    n = sum(len(b) for b in broken.values())
    where = "; ".join(f"{f}: {_listing(b)}" for f, b in broken.items())
    if bad_rows != "skip":
        raise DataError(f"{key}: {n} line{'s are' if n > 1 else ' is'} not valid JSON objects — {where}. Fix "
                        f"{'them' if n > 1 else 'it'}, or set data.bad_rows=skip to train without "
                        f"{'them' if n > 1 else 'it'}")
    log.warning("%s: skipped %d line(s) that are not valid JSON objects (data.bad_rows=skip) — %s", key, n, where)
    clean, entries = [], []
    for f in files:
        if f in broken:
            copy, kept = _without_lines(f, {i for i, _ in broken[f]})
            clean.append(copy)
            entries.append((f, kept))
        else:
            clean.append(f)
            entries.append((f, "lines"))
    return datasets.load_dataset("json", data_files=[str(f) for f in clean], split="train"), RowOrigin(entries, n)


def _load(source: str, split: str, base_dir: str | None, bad_rows: str, key: str):
    datasets = _quiet_datasets()
    if source.startswith("builtin:"):
        from unitrain.data.demo import materialize

        source = str(materialize(source.split(":", 1)[1], Path(default_cache_root())))
    path = Path(source).expanduser()
    if not path.exists() and base_dir and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    try:
        if path.is_file():
            if path.suffix.lower() not in _BUILDERS:
                raise DataError(f"data file {path}: unsupported extension {path.suffix!r}; use "
                                f"{', '.join(_BUILDERS)} or a hub dataset name")
            return _load_files(datasets, [path], bad_rows, key, single=True)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _BUILDERS)
            if not files:
                raise DataError(f"data folder {path} holds no {', '.join(_BUILDERS)} files")
            return _load_files(datasets, files, bad_rows, key, single=False)
        if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _BUILDERS:
            raise DataError(f"data file not found: {source}. Check the path (relative paths resolve against the "
                            f"working directory, then the recipe's folder)")
        return datasets.load_dataset(source, split=split), RowOrigin([(source, None)])
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; all mean "could not read this source"
        hint = (" (no network here? hub datasets need HF_HUB_OFFLINE unset and a reachable hub, or a local copy)"
                if not path.exists() else "")
        raise DataError(f"could not load data from {source!r}: {type(e).__name__}: {e}{hint}") from None


def _missing_values(ds, fmt: str, fields: dict) -> dict[str, list[int]]:
    """{column: row indices} of rows whose required column is null, missing or blank (nothing to train on)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    f = resolve_fields(fields)
    table = ds.data.table if ds._indices is None else ds.with_format("arrow")[:]  # a selection: its own rows
    out = {}
    for role in FORMAT_KEYS[fmt]:
        col = table.column(f[role])
        bad = pc.is_null(col)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            bad = pc.or_(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            bad = pc.or_(bad, pc.equal(pc.list_value_length(col), 0))
        bad = pc.fill_null(bad, True)
        idx = pc.indices_nonzero(bad).to_pylist() if pc.any(bad).as_py() else []
        if idx:
            out[f[role]] = idx
    return out


def _drop_bad_rows(ds, origin: RowOrigin, fmt: str, cfg, key: str):
    """data.bad_rows: error -> a DataError listing them; skip -> the dataset without them, printed. -> (ds, n)"""
    missing = _missing_values(ds, fmt, cfg.fields)
    if not missing:
        return ds, 0
    rows = sorted({i for idx in missing.values() for i in idx})
    what = "; ".join(f"{len(idx)} with no {col!r} (null, missing or blank): {origin.describe(idx)}"
                     for col, idx in missing.items())
    if cfg.bad_rows != "skip":
        raise DataError(f"{key}: {len(rows)} of {len(ds)} rows have nothing to train on — {what}. Fix or remove "
                        f"them, or set data.bad_rows=skip to train without them (counted and printed)")
    log.warning("%s: skipped %d of %d rows (data.bad_rows=skip) — %s", key, len(rows), len(ds), what)
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop]), len(rows)


@dataclass
class TokenizedData:
    train: list[dict]  # tokenized examples: input_ids, labels, n_tokens, n_loss_tokens, truncated
    eval: list[dict]
    eval_examples: list  # formats.Example of the eval split (for generation-based metrics)
    train_records: list[dict]  # canonical {"prompt", "response", "id", "n_tokens"} for selection
    format: str
    skipped: dict  # reason -> count
    # the rows as read (a datasets.Dataset: row `id` of a record is that record's original row, every column), so a
    # selected subset can be written in the input's own columns; the eval split's too when carved from data.train
    train_source: object = None
    eval_source: object = None


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

    ds, origin = _load(cfg.train, cfg.split, base_dir, cfg.bad_rows, "data.train")
    if len(ds) == 0:
        raise DataError(f"data.train {cfg.train!r} holds no rows")
    fmt = detect_format(ds.column_names, cfg.fields, cfg.format)
    bad = {"bad_json_lines": origin.skipped_lines}
    ds, bad["bad_rows"] = _drop_bad_rows(ds, origin, fmt, cfg, "data.train")
    if len(ds) == 0:
        raise DataError(f"data.train {cfg.train!r}: every row was skipped as bad (data.bad_rows=skip); nothing is "
                        f"left to train on")
    if cfg.eval:
        eval_ds, eval_origin = _load(cfg.eval, "test", base_dir, cfg.bad_rows, "data.eval")
        detect_format(eval_ds.column_names, cfg.fields, fmt)
        eval_ds, bad["eval_bad_rows"] = _drop_bad_rows(eval_ds, eval_origin, fmt, cfg, "data.eval")
        bad["eval_bad_json_lines"] = eval_origin.skipped_lines
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
    skipped: dict = {k: v for k, v in bad.items() if v}
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
    return TokenizedData(train_rows, eval_rows, eval_examples, canon, fmt, skipped, train_ds,
                         eval_ds if eval_ds is not None and not cfg.eval else None)
