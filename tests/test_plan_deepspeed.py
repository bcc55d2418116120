"""The one DeepSpeed config: made by the planner (plan/deepspeed.py), checked by DeepSpeed's own config models,
written by `unitrain plan --deepspeed-config` without torch, and exactly what `unitrain run` hands the engine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from unitrain.plan import make_plan
from unitrain.recipe import validate
from unitrain.resources import ResourceSpec, lookup_accelerator, parse_memory

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


def _plan(method="full", gbs=64, gpus=8, **strategy):
    r = validate({"model": {"name": "meta-llama/Llama-3.1-8B"}, "data": {"train": "org/ds", "max_length": 4096},
                  "method": {"name": method}, "training": {"global_batch_size": gbs, "max_grad_norm": 0.5},
                  "strategy": strategy}, check_files=False)
    a = lookup_accelerator("H100")
    return r, make_plan(r, ResourceSpec(gpus, 1, a.memory, parse_memory("2TiB"), a.name, a.peak_flops, a.mfu))


@needs_deepspeed
@pytest.mark.parametrize("strategy", [{"zero_stage": 1}, {"zero_stage": 2, "offload_optimizer": True},
                                      {"zero_stage": 3}, {"zero_stage": 3, "offload_optimizer": True,
                                                          "offload_params": True}])
def test_config_matches_the_plan_and_validates(strategy):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    recipe, plan = _plan(**strategy)
    cfg, s = plan.execution.deepspeed, plan.execution
    assert cfg["train_batch_size"] == 64 == s.micro_batch_size * s.grad_accum * plan.world_size
    assert cfg["train_micro_batch_size_per_gpu"] == s.micro_batch_size
    assert cfg["gradient_accumulation_steps"] == s.grad_accum and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])  # DeepSpeed's pydantic model rejects unknown keys
    assert zero.stage == strategy["zero_stage"]
    assert (zero.offload_optimizer is not None) == bool(strategy.get("offload_optimizer"))
    assert (zero.offload_param is not None) == bool(strategy.get("offload_params"))
    # the optimizer is always the client torch/bitsandbytes one: the same update as on the torch path
    assert "optimizer" not in cfg and "scheduler" not in cfg and cfg["zero_allow_untested_optimizer"] is True


def test_zero_stage_0_has_no_engine_config_and_fp16_on_v100():
    r = validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "org/ds", "max_length": 512},
                  "method": {"name": "full"}, "training": {"global_batch_size": 8},
                  "strategy": {"zero_stage": 2}}, check_files=False)
    a = lookup_accelerator("V100")
    plan = make_plan(r, ResourceSpec(2, 1, a.memory, parse_memory("64GiB"), a.name, a.peak_flops, a.mfu))
    assert plan.execution.deepspeed["fp16"]["enabled"] and not plan.execution.deepspeed["bf16"]["enabled"]
    cpu = make_plan(r, ResourceSpec(0, 1, parse_memory("32GiB"), parse_memory("32GiB"), "CPU", 50e9, 0.5))
    assert cpu.resources.on_cpu and not cpu.execution.deepspeed["bf16"]["enabled"]
    assert cpu.execution.deepspeed["zero_optimization"]["overlap_comm"] is False  # gloo: nothing to overlap
    plain = make_plan(validate({**r.to_dict(), "strategy": {"zero_stage": 0}}, check_files=False),
                      ResourceSpec(2, 1, a.memory, parse_memory("64GiB"), a.name, a.peak_flops, a.mfu))
    assert plain.execution.deepspeed is None


def test_plan_writes_the_config_without_torch(tmp_path):
    """`unitrain plan --deepspeed-config` is pure: it runs where torch cannot even be imported (a laptop)."""
    out = tmp_path / "ds.json"
    code = ("import sys; sys.modules['torch'] = None; from unitrain.cli import main; "
            f"sys.exit(main(['plan', 'recipes/plan-llama8b-full-8x80g.yaml', '--deepspeed-config', {str(out)!r}]))")
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "UNITRAIN_CALIBRATION": str(tmp_path / "c.json")})
    assert res.returncode == 0, res.stderr
    written = json.loads(out.read_text())
    from unitrain.recipe import load_recipe

    r = load_recipe(repo / "recipes" / "plan-llama8b-full-8x80g.yaml", check_files=False)
    assert written == make_plan(r).execution.deepspeed
    assert "written to" in res.stderr and "written to" not in res.stdout  # messages on stderr, the plan on stdout


def test_zero_plan_without_deepspeed_config_is_a_clear_error(tmp_path):
    from unitrain.cli import main

    rc = main(["plan", "recipes/plan-llama8b-lora-24g.yaml", "--deepspeed-config", str(tmp_path / "x.json")])
    assert rc == 2 and not (tmp_path / "x.json").exists()
