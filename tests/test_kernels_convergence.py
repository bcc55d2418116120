"""A tiny Llama trained with and without the kernels follows the same loss curve.

The kernels run in Triton's interpreter in fp32. They only reorder fp32 sums, so the two runs agree
to round-off and drift apart only through AdamW's amplification of it. Stated tolerance: |Δloss| ≤ 1e-4
at every one of 30 steps (measured: ≤ 3e-6) while the loss falls from ~5.7 to ~0.1. About 12 s on one
CPU core.
"""

import copy

import pytest
import torch

pytest.importorskip("triton")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from unitrain_kernels import patch_model, unpatch_model  # noqa: E402

LOSS_TOL = 1e-4


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def progression_batches(steps, batch=2, seq=12, cycle=16, seed=0):
    """Runs through a cycle of 16 of the 300 tokens (next = current + 1 mod 16): learnable in a few
    dozen steps, so the loss really falls."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, cycle, (batch, 1), generator=g)
        ids = (start + torch.arange(seq)) % cycle
        labels = ids.clone()
        labels[:, :2] = -100  # a masked prompt
        out.append((ids, labels))
    return out


def train(model, batches, lr=5e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for ids, labels in batches:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_pair(steps, lora=False, lr=5e-3):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    eager = LlamaForCausalLM(config)
    kernels = ["rmsnorm", "rope", "swiglu", "fused_ce"]
    if lora:  # adapters on every linear layer, the base frozen: the fused LoRA kernel runs in all 14
        from peft import LoraConfig, get_peft_model

        eager = get_peft_model(eager, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        kernels.append("lora")
    fused = copy.deepcopy(eager)
    report = patch_model(fused, mode="on")
    assert all(report.is_active(k) for k in kernels), str(report)
    batches = progression_batches(steps)
    try:
        return train(eager, batches, lr), train(fused, batches, lr)
    finally:
        unpatch_model(fused)


def check_curves(want, got):
    diffs = [abs(a - b) for a, b in zip(want, got)]
    assert max(diffs) <= LOSS_TOL, f"max |Δloss| {max(diffs):.2e} > {LOSS_TOL} (per step: {diffs})"
    assert diffs[0] <= 1e-5  # identical weights: only round-off


def test_thirty_step_training_run_matches_eager():
    want, got = run_pair(steps=30)
    check_curves(want, got)
    assert got[-1] < got[0] - 4.0  # it really learns the cycle (5.7 -> ~0.1)


def test_lora_run_with_every_kernel_matches_eager():
    """peft LoRA (r=8, all linear layers) with the fused LoRA linear and the other four kernels."""
    want, got = run_pair(steps=30, lora=True)  # measured: max |Δloss| ≈ 1e-6
    check_curves(want, got)
    assert got[-1] < got[0] - 1.0  # the adapters alone learn part of the cycle (5.7 -> ~4.6)
