"""Memory model: hand-computed formulas, and saved activations against exact CPU byte accounting."""

from __future__ import annotations

import math

import pytest

from unitrain.plan.memory import (NF4_BYTES, nf4_bytes, LoraSpec, activation_bytes, estimate_memory, optimizer_state_bytes,
                                  precision_for, trainable_tensors, zero_partitions)
from unitrain.plan.schema import Execution
from unitrain.plan.shape import KNOWN_CONFIGS, shape_from_config

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
GiB = 1024**3


def comps(est):
    return {c.name: c for c in est.components}


def test_full_fp32_layer_activations_by_hand():
    shape = shape_from_config(TINY)
    b, s = 2, 24
    T, h, hq, hkv, inter, heads = b * s, 64, 64, 32, 176, 4
    st = Execution(method="full", micro_batch_size=b, dtype="float32")
    act = activation_bytes(shape, b, s, st, precision_for(st, on_cpu=True), LoraSpec())
    norms = 2 * (4 * T * h + 4 * T + 4 * T * h)  # fp32 input, rstd, normalised output (weight trains)
    attention = 4 * T * (2 * hq + 2 * hkv) + 4 * b * heads * s  # q, k, v (kv heads), out, logsumexp
    mlp = 4 * 3 * T * inter  # gate, act(gate), up
    inputs = 4 * (2 * T * h + T * inter)  # shared q/k/v input, shared gate/up input, down input
    assert act["per_layer"] == norms + attention + mlp + inputs
    head = 8 * T + (4 * T * h + 4 * T + 4 * T * h) + 4 * T * h + 2 * s * 16 * 4 + 4 * T * 1000 + 8 * T
    assert act["total"] == 2 * act["per_layer"] + head


def test_checkpointing_keeps_layer_inputs_only():
    shape = shape_from_config(TINY)
    st = Execution(method="full", micro_batch_size=2, dtype="float32", checkpointing="full")
    p = precision_for(st, on_cpu=True)
    act = activation_bytes(shape, 2, 24, st, p, LoraSpec())
    assert act["layers"] == 0 and act["checkpoint_inputs"] == 2 * 48 * 64 * 4
    every2 = activation_bytes(shape_from_config(dict(TINY, num_hidden_layers=5)), 2, 24,
                              Execution(method="full", micro_batch_size=2, dtype="float32", checkpointing=2), p,
                              LoraSpec())
    assert every2["n_ckpt"] == 3  # layers 0, 2, 4


def test_zero_stages_follow_the_zero_paper():
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    psi, N = shape.total_params, 8
    for stage, w, g, o in ((1, 2 * psi, 2 * psi, 12 * psi / N), (2, 2 * psi, 2 * psi / N, 12 * psi / N),
                           (3, 2 * psi / N, 2 * psi / N, 12 * psi / N)):
        st = Execution(method="full", zero_stage=stage, dtype="bfloat16", micro_batch_size=1)
        c = comps(estimate_memory(shape, st, 1024, N, N, on_cpu=False))
        assert (c["weights"].bytes, c["gradients"].bytes, c["optimizer"].bytes) == (int(w), int(g), int(o))
        # DeepSpeed's step casts the gradient partition to fp32: a 4 B copy (ZeRO-1/2), or replacing the freed
        # 16-bit gradient per 1e9-element sub-group (ZeRO-3)
        assert c["step_temporaries"].bytes == int(4 * psi / N if stage < 3 else 2 * min(psi / N, 1e9))
    # No ZeRO on CUDA: fp32 weights + autocast, fp32 grads, fp32 Adam moments.
    c = comps(estimate_memory(shape, Execution(method="full", dtype="bfloat16"), 1024, 1, 1, on_cpu=False))
    assert (c["weights"].bytes, c["gradients"].bytes, c["optimizer"].bytes) == (4 * psi, 4 * psi, 8 * psi)


def test_offload_moves_states_to_cpu_and_counts_cpu_memory():
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    psi = shape.total_params
    st = Execution(method="full", zero_stage=3, offload_optimizer=True, offload_params=True, dtype="bfloat16")
    est = estimate_memory(shape, st, 1024, 8, 8, on_cpu=False)
    c = comps(est)
    assert c["optimizer"].device == c["weights"].device == c["gradients"].device == "cpu"
    assert est.cpu_needed >= 8 * (12 + 4 + 2) * psi // 8
    on_gpu = estimate_memory(shape, Execution(method="full", zero_stage=3, dtype="bfloat16"), 1024, 8, 8, False)
    assert est.peak < on_gpu.peak


def test_eight_bit_optimizer_state_bytes():
    shape = shape_from_config(TINY)
    st = Execution(optimizer="adamw8bit")
    n, _ = optimizer_state_bytes(shape, st, [10_000, 100], master=False)
    # small tensors keep fp32 state; two shared 256-entry fp32 quantization maps
    assert n == 2 * 10_000 + 2 * 4 * math.ceil(10_000 / 256) + 8 * 100 + 2 * 256 * 4
    n, _ = optimizer_state_bytes(shape, Execution(optimizer="adamw"), [10_000], master=True)
    assert n == 12 * 10_000


def test_eight_bit_states_over_zero_partitions():
    """ZeRO hands bitsandbytes one flat fp32 partition per param group (matrices decay, vectors do not)."""
    shape = shape_from_config(TINY)  # 2 layers, h=64, tied embeddings: vectors are 2×2 norms + the final norm
    psi_t = sum(trainable_tensors(shape, "full", LoraSpec()))
    vectors = 2 * 2 * 64 + 64
    assert zero_partitions(shape, "full", LoraSpec(), 2, 2) == [math.ceil((psi_t - vectors) / 2), vectors // 2]
    lora = sum(trainable_tensors(shape, "lora", LoraSpec()))
    assert zero_partitions(shape, "lora", LoraSpec(), 4, 3) == [math.ceil(lora / 4)]  # LoRA: matrices only
    big = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    parts = zero_partitions(big, "full", LoraSpec(), 2, 3)  # ZeRO-3: sub-groups of at most 1e9 elements
    assert max(parts) == 1_000_000_000 and sum(parts) == pytest.approx(big.total_params / 2, abs=2)
    st = Execution(method="full", zero_stage=2, optimizer="adamw8bit")
    opt = comps(estimate_memory(shape, st, 64, 2, 2, on_cpu=True))["optimizer"]
    m, v = math.ceil((psi_t - vectors) / 2), vectors // 2  # v = 160 < 4096: fp32 moments
    assert opt.bytes == 4 * (m + v) + 2 * m + 2 * 4 * math.ceil(m / 256) + 8 * v + 2 * 256 * 4
    adamw = comps(estimate_memory(shape, Execution(method="full", zero_stage=2), 64, 2, 2, on_cpu=True))["optimizer"]
    assert opt.bytes < 0.55 * adamw.bytes  # ~6 B instead of 12 B per trainable parameter and rank


def test_zero2_offload_host_buffers():
    """DeepSpeed stage_1_and_2 with cpu_offload keeps a 16-bit host copy of the partition, 16-bit host gradient
    accumulators when accumulating, and a staging buffer of the largest trainable tensor on host and device."""
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    psi, largest = shape.total_params, shape.vocab_size * shape.hidden_size  # untied: embedding = lm_head size
    for accum, copies in ((1, 1), (4, 2)):
        st = Execution(method="full", zero_stage=2, offload_optimizer=True, dtype="bfloat16", grad_accum=accum)
        c = comps(estimate_memory(shape, st, 1024, 8, 8, on_cpu=False))
        assert c["offload_buffers"].device == "cpu" and c["offload_staging"].device == "gpu"
        assert c["offload_buffers"].bytes == int(2 * (copies * psi / 8 + largest))
        assert c["offload_staging"].bytes == 2 * largest
    z3 = comps(estimate_memory(shape, Execution(method="full", zero_stage=3, offload_optimizer=True,
                                               dtype="bfloat16"), 1024, 8, 8, on_cpu=False))
    assert "offload_buffers" not in z3  # stage 3 offloads through its own sub-group buffers


def test_qlora_weights_are_nf4_plus_fp32_rest():
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-70B"])
    lin = shape.num_layers * shape.linear_params_per_layer
    est = estimate_memory(shape, Execution(method="qlora", dtype="bfloat16"), 1024, 1, 1, on_cpu=False)
    w = comps(est)["weights"].bytes
    assert abs(w - (lin * NF4_BYTES + (shape.total_params - lin) * 4)) < 1e-4 * w  # + per-tensor tables
    assert abs(NF4_BYTES * 8 - 4.127) < 0.001
    assert nf4_bytes(4096 * 4096) == 4096 * 4096 // 2 + 4096 * 64 + 4 * 1024 + 4 * 273


def test_fused_cross_entropy_removes_the_logits():
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    base = Execution(method="lora", dtype="bfloat16", micro_batch_size=4)
    plain = comps(estimate_memory(shape, base, 2048, 1, 1, on_cpu=False))["logits_loss"].bytes
    fused = comps(estimate_memory(shape, Execution(**{**base.__dict__, "kernels": ["fused_ce"]}), 2048, 1, 1,
                                  on_cpu=False))["logits_loss"].bytes
    T, V = 4 * 2048, shape.vocab_size
    assert plain >= 14 * T * V  # fp32 log-probs + fp32 grads + held bf16 logits
    assert fused < plain / 20  # Liger reports > 4x less at 128k vocabulary; chunking keeps ~T·h


def test_peak_is_the_largest_phase_plus_overhead():
    from unitrain.plan.memory import PHASES

    shape = shape_from_config(KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"])
    est = estimate_memory(shape, Execution(method="full", dtype="bfloat16", micro_batch_size=2), 512, 1, 1, False)
    gpu = [c for c in est.components if c.device == "gpu" and c.name != "overhead"]
    assert set(est.phases) == set(PHASES) and est.allocated_peak == max(est.phases.values())
    assert est.phases[est.peak_phase] == est.allocated_peak
    for c in gpu:  # a component's bytes are the most of it alive at any moment; resident ones are alive throughout
        alive = c.inputs.get("alive")
        assert alive is None or max(alive.values()) <= c.bytes, c.name
        assert alive is not None or c.inputs["phase"] == "always", c.name
    assert est.allocated_peak < sum(c.bytes for c in gpu)  # the terms of different phases never add up
    assert est.peak == est.allocated_peak + comps(est)["overhead"].bytes
    assert all(c.formula and "phase" in c.inputs for c in est.components)


def test_autocast_cache_holds_every_layer_at_the_second_forward_by_hand():
    """Full fine-tuning, fp32 params + bf16 autocast, full checkpointing, 2 micro-batches: the peak is the second
    micro-batch's loss — weights, the first's gradients, optimizer states, a bf16 copy of every trainable matmul
    weight (autocast's cache clears only when the outermost autocast exits, checkpointed layers included), the
    layer inputs and head, the logits (bf16), their fp32 upcast, the log-probs and the final hidden state."""
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    psi, L, h, V, T = shape.total_params, shape.num_layers, 4096, shape.vocab_size, 1024
    st = Execution(method="full", checkpointing="full", micro_batch_size=1, grad_accum=2, dtype="bfloat16")
    est = estimate_memory(shape, st, T, 1, 1, False)
    c = comps(est)
    cache = 2 * (L * shape.linear_params_per_layer + V * h)
    assert c["autocast_weight_copies"].bytes == cache  # 14.96 GiB on the 8B
    loss_fwd = (4 + 2 + 4) * T * V + 8 * T + T * h * 4  # log-probs, logits, upcast, targets, final hidden
    assert est.peak_phase == "forward"
    assert est.allocated_peak == (4 + 4 + 8) * psi + cache + c["activations"].bytes + loss_fwd
    # one micro-batch: no earlier gradients in its forward; the end of backward is larger then
    one = estimate_memory(shape, Execution(**{**st.__dict__, "grad_accum": 1}), T, 1, 1, False)
    assert one.phases["forward"] == est.phases["forward"] - 4 * psi
    # not caching inside checkpoints: the copies outside them (lm_head) + the one layer being cast
    off = estimate_memory(shape, st, T, 1, 1, False, autocast_cache_in_checkpoints=False)
    assert comps(off)["autocast_weight_copies"].bytes == 2 * (shape.linear_params_per_layer + V * h)


def test_lora_checkpointing_peaks_in_the_head_backward_alone():
    """log_softmax's backward holds the log-probs, their gradient and the logits' gradient on top of what the
    forward saved; one layer's backward working memory comes only after those are freed."""
    shape = shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    st = Execution(method="lora", checkpointing="full", micro_batch_size=1, dtype="bfloat16")
    est = estimate_memory(shape, st, 1024, 1, 1, False)
    c = comps(est)
    resident = sum(c[k].bytes for k in ("weights", "adapters", "optimizer"))
    assert est.peak_phase == "head backward"
    assert est.allocated_peak == resident + c["autocast_weight_copies"].inputs["saved"] + c["activations"].bytes + \
        c["logits_loss"].bytes


@pytest.mark.parametrize("method,ckpt", [("full", "off"), ("full", "full"), ("lora", "off"), ("lora", "full")])
def test_predictions_match_exact_cpu_accounting(method, ckpt):
    """The planner's bytes equal what one real training step holds (tiny Llama, fp32, CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from unitrain import model as M
    from unitrain.plan.calibrate import measure_cpu_memory
    from unitrain.recipe import LoraConfig

    c = dict(TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c),
                                             attn_implementation="sdpa")
    model.config.use_cache = False
    lora = LoraConfig(r=8, alpha=16, dropout=0.05)
    model = M.apply_method(model, method, lora, ckpt)
    M.apply_checkpointing(model, ckpt)
    model.train()
    ids = torch.randint(0, 1000, (2, 24))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    meas = measure_cpu_memory(model, {"input_ids": ids, "labels": ids}, optimizer=opt)
    st = Execution(method=method, checkpointing=ckpt, micro_batch_size=2, dtype="float32")
    est = estimate_memory(shape_from_config(TINY), st, 24, 1, 0, on_cpu=True, lora=LoraSpec(8, 0.05))
    c = comps(est)
    assert meas["parameters"] == c["weights"].bytes + (c["adapters"].bytes if method == "lora" else 0)
    assert meas["gradients"] == c["gradients"].bytes
    assert meas["optimizer"] == c["optimizer"].bytes
    assert abs(meas["activations"] - est.activations["total"]) <= 0.001 * meas["activations"]
