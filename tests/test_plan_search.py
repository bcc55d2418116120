"""make_plan: explicit choices kept, search properties, length rules, refusals and errors."""

from __future__ import annotations

import math
import time

import pytest

from unitrain.errors import MissingPackageError, PlanError
from unitrain.plan import DataStats, make_plan, search
from unitrain.recipe import validate
from unitrain.resources import ResourceSpec, lookup_accelerator, parse_budget, parse_memory

GiB = 1024**3


def recipe(model="meta-llama/Llama-3.1-8B", method="lora", seq=2048, gbs=16, **sections):
    d = {"model": {"name": model}, "data": {"train": "org/dataset", "max_length": seq},
         "method": {"name": method}, "training": {"global_batch_size": gbs}}
    for key, val in sections.items():
        sec, name = key.split("__")
        d.setdefault(sec, {})[name] = val
    return validate(d, check_files=False)


def spec(gpus=1, mem="24GiB", acc="RTX4090", cpu="128GiB", budget=None, nodes=1):
    a = lookup_accelerator(acc)
    return ResourceSpec(gpus, nodes, parse_memory(mem), parse_memory(cpu), a.name, a.peak_flops, a.mfu,
                        parse_budget(budget) if budget else None)


@pytest.fixture(autouse=True)
def no_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "calibration.json"))


def test_lora_8b_on_24gib_fits_its_own_prediction_fast():
    t = time.perf_counter()
    plan = make_plan(recipe(), spec())
    assert time.perf_counter() - t < 1.0
    assert plan.strategy.method == "lora" and plan.peak_memory <= plan.usable_memory
    assert plan.strategy.micro_batch_size * plan.strategy.grad_accum * plan.world_size == plan.global_batch_size
    assert plan.strategy.dtype == "bfloat16" and "fused_ce" in plan.strategy.kernels
    names = {c.name for c in plan.memory}
    assert {"weights", "gradients", "optimizer", "activations", "logits_loss", "overhead"} <= names
    assert all(c.formula and c.inputs for c in plan.memory)
    assert plan.rejected and all(r["reason"] for r in plan.rejected)


@pytest.mark.parametrize("model,method,gpus,mem", [("meta-llama/Llama-3.1-8B", "lora", 1, "24GiB"),
                                                   ("meta-llama/Llama-3.1-8B", "full", 8, "80GiB"),
                                                   ("HuggingFaceTB/SmolLM2-135M", "full", 1, "16GiB"),
                                                   ("meta-llama/Llama-3.1-70B", "qlora", 1, "80GiB")])
def test_a_feasible_plan_fits_its_prediction(model, method, gpus, mem):
    plan = make_plan(recipe(model, method, gbs=32), spec(gpus, mem, "H100"))
    assert plan.peak_memory <= plan.usable_memory
    assert plan.predicted_allocated < plan.peak_memory
    gpu = sum(c.bytes for c in plan.memory if c.device == "gpu")
    assert plan.peak_memory <= gpu  # the two phases never count together


def test_more_memory_never_lowers_throughput():
    r = recipe("meta-llama/Llama-3.2-1B", "full", seq=2048, gbs=32)
    speeds = []
    for mem in ("12GiB", "16GiB", "24GiB", "40GiB", "80GiB", "141GiB"):
        plan = make_plan(r, spec(1, mem, "H100", cpu="512GiB"))
        speeds.append(plan.tokens_per_step / plan.step_time_s)
    assert speeds == sorted(speeds)
    assert speeds[-1] > speeds[0]


def test_explicit_choices_are_kept():
    r = recipe(training__micro_batch_size=1, training__gradient_checkpointing="full", training__optimizer="adamw8bit")
    s = make_plan(r, spec(1, "80GiB", "H100")).strategy
    assert (s.micro_batch_size, s.grad_accum, s.checkpointing, s.optimizer, s.zero_stage) == (1, 16, "full",
                                                                                                "adamw8bit", 0)
    s = make_plan(recipe(method="full", strategy__zero_stage=2), spec(8, "80GiB", "H100")).strategy
    assert s.zero_stage == 2 and s.method == "full"


def test_zero_with_8bit_adam_when_memory_is_tight():
    """8×24 GiB, no host room to offload: 8-bit states over ZeRO-3 partitions leave room for a larger micro-batch."""
    tight = spec(8, "24GiB", "A10G", cpu="32GiB")
    auto = make_plan(recipe(method="full", gbs=32), tight)
    fp32 = make_plan(recipe(method="full", gbs=32, training__optimizer="adamw"), tight)
    assert (auto.strategy.zero_stage, auto.strategy.optimizer, auto.strategy.offload_optimizer) == (3, "adamw8bit", False)
    assert fp32.strategy.optimizer == "adamw" and fp32.strategy.micro_batch_size < auto.strategy.micro_batch_size
    assert auto.tokens_per_step / auto.step_time_s > fp32.tokens_per_step / fp32.step_time_s
    roomy = make_plan(recipe(method="full", gbs=32), spec(8, "80GiB", "H100", cpu="2TiB"))
    assert roomy.strategy.optimizer == "adamw"  # equally fast: the simpler optimizer wins the tie
    with pytest.raises(PlanError, match="offload_optimizer"):
        make_plan(recipe(method="full", training__optimizer="adamw8bit", strategy__offload_optimizer=True), tight)


def test_method_list_is_an_ordered_preference():
    r = recipe("meta-llama/Llama-3.2-1B", ["full", "lora"], seq=1024)
    assert make_plan(r, spec(1, "80GiB", "H100")).strategy.method == "full"
    assert make_plan(r, spec(1, "8GiB", "L4", cpu="16GiB")).strategy.method == "lora"  # no room to offload


def test_cpu_plans_fp32_without_deepspeed_or_kernels():
    r = recipe("HuggingFaceTB/SmolLM2-135M", "lora", seq=256, gbs=4)
    cpu = ResourceSpec(0, 1, 64 * GiB, 64 * GiB, "CPU", 50e9, 0.5)
    s = make_plan(r, cpu).strategy
    assert (s.dtype, s.zero_stage, s.kernels) == ("float32", 0, [])
    assert make_plan(recipe(training__kernels="on"), spec(1, "24GiB")).strategy.kernels
    assert make_plan(r, spec(1, "16GiB", "V100")).strategy.dtype == "float16"


def test_global_batch_must_divide_over_ranks():
    with pytest.raises(PlanError, match="global_batch_size"):
        make_plan(recipe(gbs=12), spec(8, "80GiB", "H100"))
    with pytest.raises(PlanError, match="micro_batch_size=3"):
        make_plan(recipe(training__micro_batch_size=3), spec())


def test_missing_packages_are_skipped_or_refused(monkeypatch):
    monkeypatch.setattr(search, "has_package", lambda name: name not in ("deepspeed", "bitsandbytes"))
    plan = make_plan(recipe(method="full", model="meta-llama/Llama-3.2-1B"), spec(2, "80GiB", "H100"))
    assert plan.strategy.zero_stage == 0 and plan.strategy.optimizer == "adamw"
    assert any("unitrain[deepspeed]" in n for n in plan.notes)
    with pytest.raises(MissingPackageError, match=r"pip install 'unitrain\[deepspeed\]'"):
        make_plan(recipe(strategy__zero_stage=2), spec())
    with pytest.raises(MissingPackageError, match=r"pip install 'unitrain\[bnb\]'"):
        make_plan(recipe(method="qlora"), spec())


def test_qlora_with_zero3_is_refused():
    with pytest.raises(PlanError, match="ZeRO-3"):
        make_plan(recipe(method="qlora", strategy__zero_stage=3), spec(2, "80GiB", "H100"))


def test_offload_beyond_cpu_memory_is_refused():
    r = recipe(method="full", strategy__offload_optimizer=True, training__gradient_checkpointing="full")
    with pytest.raises(PlanError, match="CPU memory"):
        make_plan(r, spec(1, "24GiB", cpu="32GiB"))
    assert make_plan(r, spec(1, "24GiB", cpu="256GiB")).strategy.offload_optimizer


def test_nothing_fits_says_smallest_footprint_and_what_would():
    with pytest.raises(PlanError) as e:
        make_plan(recipe("meta-llama/Llama-3.1-8B", "full", training__gradient_checkpointing="full"),
                  spec(1, "80GiB", "H100", cpu="64GiB"))
    msg = str(e.value)
    assert "Smallest footprint found" in msg and "resources.gpu_memory >=" in msg
    assert "on 2 GPUs" in msg or "on 4 GPUs" in msg
    assert "resources.cpu_memory >=" in msg  # offloading would fit the GPU with a bigger host


def test_length_rules():
    r = recipe(gbs=16, seq=1024, training__max_steps=123)
    p = make_plan(r, spec())
    assert (p.max_steps, p.warmup_steps, p.cooldown_steps) == (123, math.ceil(0.05 * 123), math.ceil(0.2 * 123))
    p = make_plan(recipe(gbs=16, seq=1024), spec(budget="1e17"))
    assert p.max_steps == int(1e17 // p.flops_per_step) and p.total_flops <= 1e17
    p = make_plan(recipe(gbs=16, seq=1024), spec(budget="10M tokens"))
    assert p.max_steps == 10_000_000 // (16 * 1024)
    p = make_plan(recipe(gbs=16, seq=1024), spec(budget="2h"))
    assert p.max_steps == int(2 * 3600 / p.step_time_s)
    data = DataStats(n_examples=900, total_tokens=900_000, n_sequences=1000, seq_len=1024)
    p = make_plan(recipe(gbs=16, seq=1024, training__epochs=2.0), spec(), data_stats=data)
    assert p.max_steps == math.ceil(2 * 1000 / 16) and abs(p.epochs - p.max_steps * 16 / 1000) < 1e-9
    p = make_plan(recipe(gbs=16, seq=1024), spec(budget="1e20"), data_stats=data)
    assert p.max_steps == 4 * 1000 // 16 and any("4 epochs" in n for n in p.notes)
    p = make_plan(recipe(gbs=16, seq=1024), spec(budget="1e16"), data_stats=data)
    assert p.data["policy"] == "select" and p.data["fraction"] < 1


def test_budget_length_reserves_the_evals():
    """Evals (a forward over the eval split at step 0, every eval_every steps and at the end) come out of a FLOP or
    GPU-hour budget: the planned steps plus their evals fit it, one more step would not."""
    r = recipe(gbs=16, seq=1024, training__eval_every=10)
    data = DataStats(n_examples=90_000, total_tokens=90_000_000, n_sequences=100_000, seq_len=1024,
                     eval_tokens=400_000)
    bare = make_plan(r, spec(budget="1e17"), data_stats=DataStats(**{**data.__dict__, "eval_tokens": 0}))
    p = make_plan(r, spec(budget="1e17"), data_stats=data)
    per_eval = p.flops_per_token / 3 * 400_000

    def cost(n):
        return n * p.flops_per_step + (2 + (n - 1) // 10) * per_eval
    assert cost(p.max_steps) <= 1e17 < cost(p.max_steps + 1)
    assert p.max_steps < bare.max_steps == int(1e17 // p.flops_per_step)
    assert any("− evals" in n for n in p.notes)
    hours = make_plan(r, spec(budget="2h"), data_stats=data)
    assert hours.max_steps < int(2 * 3600 / hours.step_time_s)
    tokens = make_plan(r, spec(budget="10M tokens"), data_stats=data)  # a token budget counts training tokens
    assert tokens.max_steps == 10_000_000 // (16 * 1024)
    capped = make_plan(recipe(gbs=16, seq=1024, training__eval_every=10, training__eval_max_batches=1),
                       spec(budget="1e17"), data_stats=data)
    assert p.max_steps < capped.max_steps <= bare.max_steps


def test_budget_too_small_for_one_step():
    with pytest.raises(PlanError, match="too small for a single optimizer step"):
        make_plan(recipe(), spec(budget="1e9"))
