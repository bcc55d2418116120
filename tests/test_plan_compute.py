"""Compute model: FLOPs per token by hand, step time scaling and penalties."""

from __future__ import annotations

from unitrain.plan import compute
from unitrain.plan.schema import Execution
from unitrain.plan.shape import KNOWN_CONFIGS, shape_from_config
from unitrain.resources import ResourceSpec, lookup_accelerator

S8 = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])


def spec(gpus=1, acc="H100", nodes=1):
    a = lookup_accelerator(acc)
    return ResourceSpec(gpus, nodes, a.memory, 512 * 2**30, a.name, a.peak_flops, a.mfu)


def test_flops_per_token_by_hand():
    L, h, V, s = 32, 4096, 128256, 2048
    mm = L * (h * h + 2 * h * 1024 + h * h + 3 * h * 14336) + h * V  # decoder linears + output projection
    assert S8.matmul_params == mm
    attn = L * h * s
    assert compute.flops_per_token(S8, "full", s) == 6 * mm + 12 * attn
    assert compute.flops_per_token(S8, "lora", s, lora_params=1000) == 4 * mm + 6 * 1000 + 12 * attn
    assert compute.flops_per_token(S8, "full", s, "full") == 8 * mm + 16 * attn  # one more forward
    assert compute.flops_per_token(S8, "full", s, 2) == 6 * mm + 12 * attn + 0.5 * (2 * mm + 4 * attn)


def test_step_time_scales_with_batch_and_ranks():
    st = Execution(method="full", micro_batch_size=4, grad_accum=4, dtype="bfloat16")
    f = compute.flops_per_token(S8, "full", 2048)
    one = compute.step_time(S8, st, 2048, 16, f, spec(1), S8.total_params)
    two = compute.step_time(S8, st, 2048, 32, f, spec(1), S8.total_params)
    assert abs(two.total / one.total - 2) < 1e-9
    assert abs(one.compute - f * 16 * 2048 / (989e12 * 0.40)) < 1e-6  # 4096-token micro-batches: full MFU prior
    eight = compute.step_time(S8, st, 2048, 16, f, spec(8), S8.total_params)
    assert abs(eight.compute - one.compute / 8) < 1e-9 and eight.communication > 0


def test_offload_zero3_and_qlora_cost_time():
    f = compute.flops_per_token(S8, "full", 2048)
    base = Execution(method="full", zero_stage=3, micro_batch_size=1, grad_accum=8, dtype="bfloat16")
    t0 = compute.step_time(S8, base, 2048, 64, f, spec(8), S8.total_params)
    off = Execution(**{**base.__dict__, "offload_optimizer": True, "offload_params": True})
    t1 = compute.step_time(S8, off, 2048, 64, f, spec(8), S8.total_params)
    assert t1.offload > 0 and t1.total > t0.total
    z2 = Execution(**{**base.__dict__, "zero_stage": 2})
    assert compute.step_time(S8, z2, 2048, 64, f, spec(8), S8.total_params).communication < t0.communication
    lo = Execution(method="lora", micro_batch_size=4, grad_accum=1, dtype="bfloat16")
    ql = Execution(method="qlora", micro_batch_size=4, grad_accum=1, dtype="bfloat16")
    fl = compute.flops_per_token(S8, "lora", 2048)
    ratio = compute.step_time(S8, ql, 2048, 4, fl, spec(), 1).total / compute.step_time(S8, lo, 2048, 4, fl, spec(), 1).total
    assert abs(ratio - 1 / compute.QLORA_SLOWDOWN) < 1e-9


def test_small_micro_batches_run_below_peak():
    assert compute.size_efficiency(4096) == 1.0
    assert compute.size_efficiency(512) < compute.size_efficiency(2048) < 1.0
