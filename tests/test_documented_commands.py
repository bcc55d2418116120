"""Every `unitrain plan` command the project shows — in a recipe's header, in README.md, in `--help` — runs on a
machine without a GPU and without the GPU packages, and exits as documented (0, unless the line says
`# exits N`). The commands are read from the files, so the files stay true."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from unitrain import resources as R

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
PLACEHOLDERS = {"RECIPE", "FILE", "N", "K", "X", "NAME", "KEY", "PLAN.json", "OUT.json"}


def _command(text: str) -> tuple[str, int] | None:
    """'... unitrain plan recipes/x.yaml --gpus 1  # exits 2' -> ("plan recipes/x.yaml --gpus 1", 2)."""
    m = re.search(r"unitrain plan (recipes/\S+.*)", text)
    if not m:
        return None
    cmd, _, comment = m.group(1).partition("#")
    code = re.search(r"exits (\d+)", comment)
    words = shlex.split(cmd)
    if any(w in PLACEHOLDERS or "[" in w or "..." in w for w in words):
        return None  # a synopsis, not a command
    return "plan " + shlex.join(words), int(code.group(1)) if code else 0


def documented() -> dict[str, set]:
    """{source: {(command, exit code)}} from the recipe headers, README.md and --help."""
    from unitrain.cli import _parser

    found: dict[str, set] = {}

    def add(source, text):
        c = _command(" ".join(text.split()))
        if c:
            found.setdefault(source, set()).add(c)

    for f in sorted((REPO / "recipes").glob("*.yaml")):
        for line in f.read_text().splitlines():
            if not line.startswith("#"):
                break  # the header: the leading comment lines
            add(f"recipes/{f.name}", line.lstrip("# "))
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            if line.startswith("$ ") or line.startswith("unitrain plan"):
                add("README.md", line.removeprefix("$ ").removeprefix("COLUMNS=110 "))
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", readme, flags=re.S)):
        add("README.md", span)
    parser = _parser()
    plan_help = parser._subparsers._group_actions[0].choices["plan"].format_help()
    for line in (parser.format_help() + plan_help).splitlines():
        add("--help", line)
    return found


COMMANDS = sorted({(src, cmd, code) for src, cmds in documented().items() for cmd, code in cmds})


def test_the_documented_commands_are_found():
    """The extraction itself: each source shows some, and the ones the issue was about are among them."""
    by_source = {}
    for src, cmd, _ in COMMANDS:
        by_source.setdefault(src, set()).add(cmd)
    assert {"recipes/llama-lora.yaml", "recipes/plan-llama8b-lora-24g.yaml", "README.md", "--help"} <= set(by_source)
    assert "plan recipes/llama-lora.yaml --advise --deadline 12h" in by_source["README.md"]
    assert "plan recipes/llama-lora.yaml --gpus 1 --gpu-memory 24GiB --budget 2e18" in by_source["--help"]
    assert any("--out plan.json" in c for c in by_source["README.md"])
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("source,cmd,code", COMMANDS, ids=[f"{s}: {c}" for s, c, _ in COMMANDS])
def test_a_documented_command_runs_on_a_cpu_only_machine(source, cmd, code, tmp_path, monkeypatch):
    from unitrain.cli import main

    monkeypatch.setattr(R, "detect", lambda: {"gpus": 0, "gpu_memory": 16 * GiB, "accelerator": "CPU",
                                              "cpu_memory": 16 * GiB})
    monkeypatch.setattr(R, "installed_packages", lambda: [])  # a laptop without the GPU stack
    (tmp_path / "recipes").symlink_to(REPO / "recipes")  # files the command writes land in tmp_path
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        got = main(shlex.split(cmd))
    assert got == code, f"{source}: `unitrain {cmd}` exited {got}, documented {code}:\n{err.getvalue()[-2000:]}"
    assert out.getvalue().strip(), "printed nothing"
