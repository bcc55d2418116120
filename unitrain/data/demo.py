"""Built-in generated datasets, so the quickstart needs no download: `data.train: builtin:skills`.

`skills` is a mix of short, exactly checkable tasks (arithmetic, sorting, comparison, casing, counting)
with one-line answers. A small instruct model knows the skills but not the terse answer format, so a
few minutes of LoRA on a CPU move both eval loss and exact match measurably.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BUILTINS = ("skills",)
_VERSION = 1
_WORDS = ("apple river stone cloud tiger lemon candle forest rocket violin garden planet silver ocean "
          "mirror castle pepper window dragon summer").split()


def _skill(rng: random.Random) -> dict:
    kind = rng.choice(["add", "sub", "sort", "max", "upper", "count", "next"])
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"question": f"What is {a} + {b}?", "answer": str(a + b)}
    if kind == "sub":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        return {"question": f"What is {a} - {b}?", "answer": str(a - b)}
    if kind == "sort":
        xs = rng.sample(range(1, 50), rng.randint(3, 5))
        return {"question": f"Sort in ascending order: {', '.join(map(str, xs))}",
                "answer": ", ".join(map(str, sorted(xs)))}
    if kind == "max":
        xs = rng.sample(range(1, 100), rng.randint(3, 5))
        return {"question": f"Which number is the largest: {', '.join(map(str, xs))}?", "answer": str(max(xs))}
    if kind == "upper":
        ws = rng.sample(_WORDS, 2)
        return {"question": f"Write in capital letters: {' '.join(ws)}", "answer": " ".join(ws).upper()}
    if kind == "count":
        ws = rng.sample(_WORDS, rng.randint(2, 6))
        return {"question": f"How many words are in this list: {' '.join(ws)}?", "answer": str(len(ws))}
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    seq = [start + i * step for i in range(4)]
    return {"question": f"What number comes next: {', '.join(map(str, seq))}, ?", "answer": str(start + 4 * step)}


def generate(name: str, n: int = 2000, seed: int = 0) -> list[dict]:
    if name != "skills":
        raise ValueError(name)
    rng = random.Random(seed)
    return [_skill(rng) for _ in range(n)]


def materialize(name: str, cache_root: Path) -> Path:
    """Write the builtin dataset to a JSONL file once (stable path -> stable tokenization cache)."""
    from unitrain.errors import DataError

    if name not in BUILTINS:
        raise DataError(f"unknown builtin dataset {name!r}; available: {', '.join(BUILTINS)}")
    path = cache_root / "builtin" / f"{name}-v{_VERSION}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in generate(name)))
        tmp.replace(path)
    return path
