"""The DeepSpeed config a plan implies, checked by DeepSpeed's own config models."""

from __future__ import annotations

import importlib.util

import pytest

from unitrain.plan import make_plan
from unitrain.recipe import validate
from unitrain.resources import ResourceSpec, lookup_accelerator, parse_memory
from unitrain.strategy import deepspeed_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _plan(tmp_path, monkeypatch, method="full", gbs=64, gpus=8, **strategy):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    r = validate({"model": {"name": "meta-llama/Llama-3.1-8B"}, "data": {"train": "org/ds", "max_length": 4096},
                  "method": {"name": method}, "training": {"global_batch_size": gbs, "max_grad_norm": 0.5},
                  "strategy": strategy}, check_files=False)
    a = lookup_accelerator("H100")
    return r, make_plan(r, ResourceSpec(gpus, 1, a.memory, parse_memory("2TiB"), a.name, a.peak_flops, a.mfu))


@pytest.mark.parametrize("strategy", [{"zero_stage": 1}, {"zero_stage": 2, "offload_optimizer": True},
                                      {"zero_stage": 3}, {"zero_stage": 3, "offload_optimizer": True,
                                                          "offload_params": True}])
def test_config_matches_the_plan_and_validates(strategy, tmp_path, monkeypatch):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    recipe, plan = _plan(tmp_path, monkeypatch, **strategy)
    cfg = deepspeed_config(plan, recipe)
    s = plan.strategy
    assert cfg["train_batch_size"] == 64 == s.micro_batch_size * s.grad_accum * plan.world_size
    assert cfg["train_micro_batch_size_per_gpu"] == s.micro_batch_size
    assert cfg["gradient_accumulation_steps"] == s.grad_accum and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])  # DeepSpeed's pydantic model rejects unknown keys
    assert zero.stage == strategy["zero_stage"]
    assert (zero.offload_optimizer is not None) == bool(strategy.get("offload_optimizer"))
    assert (zero.offload_param is not None) == bool(strategy.get("offload_params"))
    assert cfg["optimizer"]["params"]["lr"] == recipe.training.lr


def test_fp16_on_v100_and_cpu_torch_adam(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    r = validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "org/ds", "max_length": 512},
                  "method": {"name": "full"}, "training": {"global_batch_size": 8},
                  "strategy": {"zero_stage": 2}}, check_files=False)
    a = lookup_accelerator("V100")
    plan = make_plan(r, ResourceSpec(2, 1, a.memory, parse_memory("64GiB"), a.name, a.peak_flops, a.mfu))
    cfg = deepspeed_config(plan, r)
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    cpu = make_plan(r, ResourceSpec(0, 1, parse_memory("32GiB"), parse_memory("32GiB"), "CPU", 50e9, 0.5), world_size=None)
    ccfg = deepspeed_config(cpu, r)
    assert not ccfg["bf16"]["enabled"] and ccfg["optimizer"]["params"].get("torch_adam") is True
    assert ccfg["zero_optimization"]["stage"] == 2


def test_8bit_plan_leaves_the_optimizer_to_the_client(tmp_path, monkeypatch):
    """DeepSpeed has no bitsandbytes optimizer type: the config names none, and allows the client optimizer."""
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    r = validate({"model": {"name": "meta-llama/Llama-3.1-8B"}, "data": {"train": "org/ds", "max_length": 4096},
                  "method": {"name": "full"}, "training": {"global_batch_size": 64, "optimizer": "adamw8bit"},
                  "strategy": {"zero_stage": 2, "offload_optimizer": False}}, check_files=False)
    a = lookup_accelerator("H100")
    plan = make_plan(r, ResourceSpec(8, 1, a.memory, parse_memory("2TiB"), a.name, a.peak_flops, a.mfu))
    assert (plan.strategy.optimizer, plan.strategy.zero_stage) == ("adamw8bit", 2)
    cfg = deepspeed_config(plan, r)
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
