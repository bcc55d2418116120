"""The house reads top-down: cli -> train (loop, governor, backends) -> data -> plan -> (resources, recipe), with
model building beside train and kernels/ standing alone. Checked on the source: every import statement (also those
inside functions), so an arrow up or a circle fails here before it confuses a reader."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "unitrain"

# module prefix -> prefixes it must never import
FORBIDDEN = {
    "unitrain.plan": ("unitrain.train", "unitrain.data", "unitrain.model", "unitrain.cli", "unitrain.dist"),
    "unitrain.data": ("unitrain.train", "unitrain.model", "unitrain.cli"),
    "unitrain.model": ("unitrain.train", "unitrain.data", "unitrain.cli"),
    "unitrain.train": ("unitrain.cli",),
    "unitrain.resources": ("unitrain.plan", "unitrain.train", "unitrain.data", "unitrain.model", "unitrain.cli"),
    "unitrain.recipe": ("unitrain.plan", "unitrain.train", "unitrain.data", "unitrain.model", "unitrain.cli"),
    "unitrain.sources": ("unitrain.plan", "unitrain.train", "unitrain.data", "unitrain.model", "unitrain.cli"),
    "unitrain.hardware": ("unitrain.",),  # the hardware table reads its data file and nothing else of unitrain
    "unitrain.errors": ("unitrain.",),
}


def _module_name(path: Path, root: Path, package: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, root, package): p for p in root.rglob("*.py")}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from unitrain.plan import calibrate` imports the submodule
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out


def test_no_arrow_points_up():
    mods = _modules(PKG, "unitrain")
    bad = []
    for name, path in mods.items():
        for imp in _imports(path, name, set(mods)):
            for prefix, forbidden in FORBIDDEN.items():
                if (name == prefix or name.startswith(prefix + ".")) and \
                        any(imp == f.rstrip(".") or imp.startswith(f if f.endswith(".") else f + ".") or imp == f
                            for f in forbidden):
                    bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_the_kernels_package_stands_alone():
    mods = _modules(REPO / "kernels", "unitrain_kernels")
    bad = [f"{n} imports {i}" for n, p in mods.items() for i in _imports(p, n, set(mods)) if i.startswith("unitrain.")
           or i == "unitrain"]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    mods = _modules(PKG, "unitrain")
    graph = {n: {i for i in _imports(p, n, set(mods)) if i in mods and i != n} for n, p in mods.items()}
    # a package's __init__ re-exporting its submodules is not a circle of its own
    for n in graph:
        graph[n] = {i for i in graph[n] if not (n.startswith(i + ".") and (PKG / Path(*i.split(".")[1:]) /
                                                                          "__init__.py").exists())}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)
