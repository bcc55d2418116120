"""Every Triton kernel against its torch reference: outputs and input/weight gradients.

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set per test by the fixture
below, fp32 only: the interpreter's bf16 arithmetic is not the GPU's). Tests marked `gpu` run the
compiled kernels in bf16/fp16 on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from unitrain_kernels import (FusedLinearCrossEntropyFunction, RMSNormFunction, apply_rope,  # noqa: E402
                              fused_linear_cross_entropy,
                              linear_cross_entropy_reference, lora_linear, lora_linear_reference, rmsnorm,
                              rmsnorm_reference, rope_reference, swiglu, swiglu_reference)
from unitrain_kernels import fused_ce as fused_ce_module  # noqa: E402
from unitrain_kernels.lora import MAX_RANK, lora_supported  # noqa: E402
from unitrain_kernels.rope import rope_supported  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32: the kernels reorder sums, nothing more


pytestmark = pytest.mark.usefixtures("triton_mode")


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def assert_close_all(got, want, **tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **(tol or TOL))


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("shape,offset,cast", [
    ((4, 7, 37), 0.0, True),   # 28 rows over 4 persistent programs, non-power-of-two hidden size
    ((6, 64), 1.0, False),     # Gemma-style (1 + w), cast after the weight
    ((3, 11, 1000), 0.0, True),  # 33 rows, 4 per tile: 9 tiles forward, a masked tail
    ((1, 5), 0.0, True),       # one row: one program
])
def test_rmsnorm_matches_reference(shape, offset, cast):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True)
    y = rmsnorm(x, w, 1e-6, offset, cast)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    y_ref = rmsnorm_reference(x, w, 1e-6, offset, cast)
    g = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert_close_all(grads(y, (x, w), g), grads(y_ref, (x, w), g))


def test_rmsnorm_non_contiguous_input_and_grad():
    torch.manual_seed(1)
    base = torch.randn(40, 6, requires_grad=True)
    x = base.t()[:, ::2]  # [6, 20]: neither dimension has unit stride
    w = torch.randn(20, requires_grad=True)
    y = RMSNormFunction.apply(x, w, 1e-5, 0.0, True)
    g = torch.randn(20, 6).t()  # non-contiguous incoming gradient
    y_ref = rmsnorm_reference(x, w, 1e-5)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert_close_all(grads(y, (base, w), g), grads(y_ref, (base, w), g))


# ---------------------------------------------------------------- RoPE

def hf_cos_sin(batch, seq, dim, base=10000.0, offset=0):
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    pos = (torch.arange(seq) + offset).float()[None].expand(batch, seq)
    emb = torch.cat([pos[..., None] * inv_freq, pos[..., None] * inv_freq], dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("cos_batch,shape", [
    (2, (2, 5, 4, 2, 12)),   # GQA, head_dim 12: half = 6 is not a power of two; one tile of positions
    (1, (2, 5, 4, 2, 12)),   # cos/sin broadcast over the batch
    (2, (2, 5, 8, 4, 256)),  # 2 positions per tile: 3 tiles per sequence, the last one masked
    (1, (1, 130, 4, 2, 16)),  # 4 + 2 heads: 4096 / (6 × 8) = 85 positions fit, rounded down to 64 per tile
])
def test_rope_gqa_on_hf_transposed_views(cos_batch, shape):
    torch.manual_seed(0)
    b, s, hq, hk, d = shape
    q_proj = torch.randn(b, s, hq * d, requires_grad=True)
    k_proj = torch.randn(b, s, hk * d, requires_grad=True)
    q = q_proj.view(b, s, hq, d).transpose(1, 2)  # as HF's attention: [b, h, s, d], non-contiguous
    k = k_proj.view(b, s, hk, d).transpose(1, 2)
    cos, sin = hf_cos_sin(cos_batch, s, d, offset=3)
    qo, ko = apply_rope(q, k, cos, sin)
    assert type(qo.grad_fn).__name__ == "RoPEFunctionBackward"
    qr, kr = rope_reference(q, k, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    assert_close_all((qo, ko), (qr, kr))
    assert_close_all(grads((qo, ko), (q_proj, k_proj), (gq, gk)), grads((qr, kr), (q_proj, k_proj), (gq, gk)))


def test_rope_general_cos_sin_unsqueeze_dim_2_and_unused_k():
    torch.manual_seed(1)
    b, s, hq, hk, d = 1, 3, 3, 1, 8
    q = torch.randn(b, s, hq, d, requires_grad=True)  # [b, s, h, d] layout
    k = torch.randn(b, s, hk, d, requires_grad=True)
    cos, sin = torch.randn(b, s, d), torch.randn(b, s, d)  # halves differ: both halves are read
    qo, ko = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    qr, kr = rope_reference(q, k, cos, sin, unsqueeze_dim=2)
    assert_close_all((qo, ko), (qr, kr))
    g = torch.randn_like(qo)
    got = torch.autograd.grad(qo, (q, k), g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(qr, (q, k), g, allow_unused=True, materialize_grads=True)
    assert_close_all(got, want)


def test_rope_declines_partial_rotary_odd_head_dim_and_grad_cos():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    assert rope_supported(q, k, *hf_cos_sin(1, 3, 8)) is None
    assert "partial" in rope_supported(q, k, *hf_cos_sin(1, 3, 4))  # rotary dim 4 < head_dim 8
    q7, k7 = torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7)
    assert rope_supported(q7, k7, torch.randn(1, 3, 7), torch.randn(1, 3, 7)) is not None
    cos, sin = hf_cos_sin(1, 3, 8)
    assert "grad" in rope_supported(q, k, cos.requires_grad_(), sin)


# ---------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("transpose", [False, True])
def test_swiglu_matches_reference(transpose):
    torch.manual_seed(0)
    a = torch.randn(3, 5, 150, requires_grad=True)  # 2250 elements: 3 programs, a masked tail
    b = torch.randn(3, 5, 150, requires_grad=True)
    ga, gb = (a.transpose(0, 2), b.transpose(0, 2)) if transpose else (a, b)
    c = swiglu(ga, gb)
    assert type(c.grad_fn).__name__ == "SwiGLUFunctionBackward"
    c_ref = swiglu_reference(ga, gb)
    g = torch.randn_like(c_ref)
    torch.testing.assert_close(c, c_ref, **TOL)
    assert_close_all(grads(c, (a, b), g), grads(c_ref, (a, b), g))


# ---------------------------------------------------------------- fused linear cross-entropy

CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(label_smoothing=0.1),
    dict(softcap=3.0),
    dict(softcap=2.0, label_smoothing=0.2, reduction="sum"),
]


@pytest.mark.parametrize("kw", CE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "mean")
def test_fused_ce_matches_reference(kw, monkeypatch):
    # V = 301 over blocks of 128 (a masked tail block), 37 tokens in chunks of 8 (a short last chunk)
    monkeypatch.setattr(fused_ce_module, "MAX_BLOCK", 128)
    torch.manual_seed(0)
    n, h, v = 37, 24, 301
    x = torch.randn(n, h, requires_grad=True)
    w = (0.3 * torch.randn(v, h)).requires_grad_()
    bias = torch.randn(v, requires_grad=True)
    t = torch.randint(0, v, (n,))
    t[::5] = -100  # ignore_index rows
    loss = fused_linear_cross_entropy(x, w, t, bias, chunk_tokens=8, **kw)
    assert type(loss.grad_fn).__name__ == "FusedLinearCrossEntropyFunctionBackward"
    ref = linear_cross_entropy_reference(x, w, t, bias, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    scale = torch.tensor(2.5)  # the backward scales by the incoming gradient
    assert_close_all(grads(loss, (x, w, bias), scale), grads(ref, (x, w, bias), scale), rtol=1e-4, atol=1e-6)


def test_fused_ce_3d_input_frozen_weight_and_param_dtype_accumulation():
    torch.manual_seed(2)
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(50, 16)  # frozen (LoRA): no weight gradient is formed
    t = torch.randint(0, 50, (2, 9))
    loss = fused_linear_cross_entropy(x, w, t, chunk_tokens=4, grad_weight_fp32=False)
    ref = linear_cross_entropy_reference(x.reshape(-1, 16), w, t.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert_close_all(grads(loss, (x,), None), grads(ref, (x,), None))


def test_fused_ce_under_no_grad_gives_the_loss_only():
    x, w, t = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True), torch.randint(0, 20, (6,))
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, w, t, label_smoothing=0.1)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(x, w, t, label_smoothing=0.1).detach())


def test_fused_ce_all_ignored_gives_nan_like_torch_and_zero_grads():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.full((4,), -100)
    loss = fused_linear_cross_entropy(x, w, t)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_reference(x, w, t))
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert not gx.any() and not gw.any()


def test_fused_ce_rejects_bad_targets_and_second_backward():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(x, w, torch.tensor([1, 20, -100]))
    loss = FusedLinearCrossEntropyFunction.apply(x, w, torch.tensor([1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


# ---------------------------------------------------------------- fused LoRA linear

@pytest.mark.parametrize("lead,k,n,r,bias", [
    ((7,), 37, 50, 3, False),      # rank 3 in a 16-wide epilogue tile; K, N not multiples of the blocks
    ((2, 65), 64, 96, 16, True),   # 130 tokens: three row tiles, the last one masked; a bias
    ((1,), 33, 129, 8, False),     # one token, N just over two column tiles
])
def test_lora_linear_matches_peft_math(lead, k, n, r, bias):
    torch.manual_seed(0)
    x = torch.randn(*lead, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)  # a trainable base too: its gradient path is checked
    a, b = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    bb = torch.randn(n, requires_grad=True) if bias else None
    y = lora_linear(x, w, a, b, 0.75, bb)
    y_ref = lora_linear_reference(x, w, a, b, 0.75, bb)
    assert y.shape == (*lead, n) and "LoRALinearFunctionBackward" in str(y.grad_fn.next_functions)
    inputs = (x, w, a, b) + ((bb,) if bias else ())
    g = torch.randn_like(y)
    tol = dict(rtol=1e-4, atol=1e-4)  # fp32 dots of K ≤ 65 unit-variance terms, summed in another order
    torch.testing.assert_close(y, y_ref, **tol)
    assert_close_all(grads(y, inputs, g), grads(y_ref, inputs, g), **tol)


def test_lora_linear_dropout_input_and_non_contiguous_x():
    """With dropout the adapters see x̃ = dropout(x) and the base sees x: both gradient paths reach x."""
    torch.manual_seed(1)
    base = torch.randn(24, 10, requires_grad=True)
    x = base.t()  # [10, 24], column-major
    w, a, b = torch.randn(40, 24), torch.randn(4, 24, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    xd = torch.nn.functional.dropout(x, 0.5)
    y = lora_linear(x, w, a, b, 2.0, x_dropped=xd)
    y_ref = lora_linear_reference(x, w, a, b, 2.0, x_dropped=xd)
    g = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref, **TOL)
    got = torch.autograd.grad(y, (base, a, b), g, retain_graph=True)  # xd's dropout node is shared
    assert_close_all(got, grads(y_ref, (base, a, b), g))


def test_lora_linear_declines_what_it_cannot_fuse():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert "rank" in lora_supported(x, w, torch.randn(MAX_RANK + 1, 8), torch.randn(5, MAX_RANK + 1))
    assert "shape" in lora_supported(x, w, torch.randn(2, 7), torch.randn(5, 2))
    assert "materialised" in lora_supported(x, torch.empty(0), torch.randn(2, 8), torch.randn(5, 2))
    a, b = torch.randn(MAX_RANK + 1, 8, requires_grad=True), torch.randn(5, MAX_RANK + 1, requires_grad=True)
    y = lora_linear(x, w, a, b, 0.5)  # falls back to the reference: autograd's own graph, no kernel node
    assert "LoRALinearFunction" not in str(y.grad_fn.next_functions)
    assert torch.equal(y, lora_linear_reference(x, w, a, b, 0.5))


def test_lora_linear_under_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(0)
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(24, 16).bfloat16()  # a 16-bit frozen base, fp32 adapters: peft's layout
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = lora_linear(x, w, a, b, 0.5), lora_linear_reference(x, w, a, b, 0.5)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    got, want = grads(y, (x, a, b), torch.ones_like(y)), grads(y_ref, (x, a, b), torch.ones_like(y_ref))
    assert [t.dtype for t in got] == [torch.float32] * 3
    assert_close_all((y,) + got, (y_ref,) + want, rtol=2e-2, atol=5e-2)


# ---------------------------------------------------------------- 16-bit inputs

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_on_cpu_match_within_one_rounding(dtype):
    """The kernels load/store 16-bit values and compute in fp32 (the interpreter's 16-bit arithmetic is
    never used); the eager references round after every op, so they differ by about one 16-bit ulp."""
    torch.manual_seed(0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=4e-3)
    x = torch.randn(6, 40, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(40)).to(dtype).requires_grad_()
    y, y_ref = rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6)
    assert y.dtype == y_ref.dtype == dtype
    g = torch.randn_like(y)
    assert_close_all((y,) + grads(y, (x, w), g), (y_ref,) + grads(y_ref, (x, w), g), **tol)
    q, k = torch.randn(1, 3, 4, 8, dtype=dtype), torch.randn(1, 1, 4, 8, dtype=dtype)
    cos, sin = (t.to(dtype) for t in hf_cos_sin(1, 4, 8))
    assert_close_all(apply_rope(q, k, cos, sin), rope_reference(q, k, cos, sin), **tol)
    a, b = torch.randn(5, 30, dtype=dtype), torch.randn(5, 30, dtype=dtype)
    torch.testing.assert_close(swiglu(a, b), swiglu_reference(a, b), **tol)
    h = torch.randn(9, 16, dtype=dtype, requires_grad=True)
    lm = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (9,))
    loss, ref = fused_linear_cross_entropy(h, lm, t), linear_cross_entropy_reference(h, lm, t)
    assert loss.dtype == ref.dtype == torch.float32
    assert_close_all((loss,) + grads(loss, (h, lm), None), (ref,) + grads(ref, (h, lm), None), **tol)


def test_fused_ce_under_autocast_runs_the_gemms_in_the_autocast_dtype():
    torch.manual_seed(0)
    x, w = torch.randn(9, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)  # fp32 master weights
    t = torch.randint(0, 50, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ref = fused_linear_cross_entropy(x, w, t), linear_cross_entropy_reference(x, w, t)
    got, want = grads(loss, (x, w), None), grads(ref, (x, w), None)
    assert [g.dtype for g in got] == [torch.float32, torch.float32]
    assert_close_all((loss,) + got, (ref,) + want, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- bf16 / fp16 on CUDA

LOW = [torch.bfloat16, torch.float16]
LOW_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", LOW)
def test_gpu_rmsnorm_rope_swiglu_low_precision(dtype):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(8, 333, 4096 + 17, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(x.shape[-1], device=dev, dtype=dtype)).requires_grad_()
    y, y_ref = rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6)
    g = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref, **LOW_TOL[dtype])
    gx, gw = grads(y, (x, w), g)
    rx, rw = grads(y_ref, (x, w), g)
    torch.testing.assert_close(gx, rx, **LOW_TOL[dtype])
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2 * rw.abs().max().item())

    b, s, hq, hk, d = 2, 257, 32, 8, 128
    q = torch.randn(b, s, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=dev, dtype=dtype, requires_grad=True)
    cos, sin = (t.to(dev, dtype) for t in hf_cos_sin(1, s, d))
    qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qr, kr = rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_close_all((qo, ko), (qr, kr), **LOW_TOL[dtype])
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    assert_close_all(grads((qo, ko), (q, k), (gq, gk)), grads((qr, kr), (q, k), (gq, gk)), **LOW_TOL[dtype])

    a = torch.randn(4, 100, 14336, device=dev, dtype=dtype, requires_grad=True)
    u = torch.randn_like(a, requires_grad=True)
    c, c_ref = swiglu(a, u), swiglu_reference(a, u)
    gc = torch.randn_like(c)
    torch.testing.assert_close(c, c_ref, **LOW_TOL[dtype])
    assert_close_all(grads(c, (a, u), gc), grads(c_ref, (a, u), gc), **LOW_TOL[dtype])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum", softcap=30.0), dict(label_smoothing=0.1)])
def test_gpu_fused_ce_low_precision(dtype, kw):
    torch.manual_seed(0)
    n, h, v = 1000, 512, 32003
    x = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.05 * torch.randn(v, h, device="cuda", dtype=dtype)).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    loss = fused_linear_cross_entropy(x, w, t, chunk_tokens=256, **kw)
    ref = linear_cross_entropy_reference(x, w, t, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    (gx, gw), (rx, rw) = grads(loss, (x, w), None), grads(ref, (x, w), None)
    for got, want in ((gx, rx), (gw, rw)):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", LOW)
def test_gpu_lora_linear_low_precision(dtype):
    """Llama-3-8B q_proj-like shapes, rank 16, a 16-bit base and fp32 adapters under autocast (the trainer's
    layout): tensor-core dots with fp32 accumulation against peft's three-GEMM eager math."""
    torch.manual_seed(0)
    x = torch.randn(2, 1000, 4096, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(4096, 4096, device="cuda")).to(dtype)
    a = (0.02 * torch.randn(16, 4096, device="cuda")).requires_grad_()
    b = (0.02 * torch.randn(4096, 16, device="cuda")).requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y, y_ref = lora_linear(x, w, a, b, 2.0), lora_linear_reference(x, w, a, b, 2.0)
    g = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref, **LOW_TOL[dtype])
    for got, want in zip(grads(y, (x, a, b), g), grads(y_ref, (x, a, b), g)):
        cos = torch.nn.functional.cosine_similarity(got.flatten().float(), want.flatten().float(), dim=0)
        assert cos > 0.999, cos.item()
