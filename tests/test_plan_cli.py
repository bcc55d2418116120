"""`unitrain plan`: table output, --json, --deepspeed-config, exit codes, the three example recipes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from unitrain.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EXAMPLES = ["plan-llama8b-lora-24g.yaml", "plan-llama8b-full-8x80g.yaml", "plan-llama70b-qlora-80g.yaml"]


@pytest.fixture(autouse=True)
def no_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "calibration.json"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_recipes_plan_within_a_second(name, capsys):
    from unitrain.plan import make_plan
    from unitrain.recipe import load_recipe

    recipe = load_recipe(RECIPES / name)
    t = time.perf_counter()
    plan = make_plan(recipe)
    assert time.perf_counter() - t < 1.0
    assert plan.memory.peak <= plan.memory.usable and plan.length.steps > 0
    assert main(["plan", str(RECIPES / name)]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "weights" in out and plan.execution.method in out
    assert RECIPES.joinpath(name).read_text().startswith("# Launch:")


def test_json_output_is_the_plan(capsys):
    assert main(["plan", str(RECIPES / EXAMPLES[0]), "training.global_batch_size=64", "--json", "--gpus", "2",
                 "--gpu-memory", "80GiB", "--accelerator", "A100", "--budget", "5e18"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["execution"]["world_size"] == 2 and plan["execution"]["global_batch_size"] == 64
    assert plan["resources"]["accelerator"] == "A100-80GB" and plan["resources"]["on_cpu"] is False
    assert (plan["budget"]["kind"], plan["budget"]["value"]) == ("flops", 5e18)
    assert plan["length"]["steps"] * plan["compute"]["flops_per_step"] <= 5e18 and plan["memory"]["components"]
    from unitrain.plan.schema import Plan

    assert Plan.from_dict(plan).to_dict() == plan  # what --json prints loads back as the plan


def test_deepspeed_config_written(tmp_path, capsys):
    out = tmp_path / "ds.json"
    assert main(["plan", str(RECIPES / EXAMPLES[1]), "--deepspeed-config", str(out)]) == 0
    cfg = json.loads(out.read_text())
    z = cfg["zero_optimization"]
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8 == 64
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and z["stage"] >= 1
    assert cfg["gradient_clipping"] == 1.0 and "optimizer" not in cfg  # the client torch AdamW, as `run` passes it
    err = capsys.readouterr().err
    assert "deepspeed.initialize(optimizer=" in " ".join(err.split()) and "adamw" in err
    # 8×24 GiB without host room to offload: the plan takes 8-bit AdamW inside ZeRO, a client optimizer as well
    assert main(["plan", str(RECIPES / EXAMPLES[1]), "--gpu-memory", "24GiB", "--cpu-memory", "32GiB", "--accelerator",
                 "A10G", "--deepspeed-config", str(out)]) == 0
    cfg = json.loads(out.read_text())
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    assert "adamw8bit" in capsys.readouterr().err


def test_nothing_fits_exits_non_zero_with_the_reason(capsys):
    code = main(["plan", str(RECIPES / EXAMPLES[1]), "--gpus", "1", "--gpu-memory", "16GiB", "--cpu-memory", "16GiB",
                 "--accelerator", "T4"])
    assert code != 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "nothing fits" in err and "Smallest footprint" in err


def test_bad_input_names_the_field(capsys):
    assert main(["plan", str(RECIPES / EXAMPLES[0]), "--accelerator", "TPU-v9"]) != 0
    assert "resources.accelerator" in " ".join(capsys.readouterr().err.split())
    assert main(["plan", str(RECIPES / EXAMPLES[0]), "--budget=-3h"]) != 0
    assert "resources.budget" in " ".join(capsys.readouterr().err.split())
    assert main(["plan", str(RECIPES / EXAMPLES[0]), "--budget", "1e9"]) != 0
    assert "too small for a single optimizer step" in " ".join(capsys.readouterr().err.split())
