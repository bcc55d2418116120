"""Fused LoRA linear: y = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ (+ bias) with the low-rank update in the GEMM's epilogue.

x: [M, K] tokens; W: [N, K] frozen base weight; A: [R, K], B: [N, R] adapters; s = alpha / r; x̃ = dropout(x)
(x itself without dropout). peft computes base(x), then lora_B(lora_A(x̃)) as a second [M, N] tensor, then their
sum: three [M, N] tensors written and two read back. Here xa = x̃·Aᵀ ([M, R], R ≪ N) is one small GEMM and the
Triton kernel adds s·xa·Bᵀ to each output tile while it is still in registers: one [M, N] write.

Backward (cuBLAS GEMMs; nothing [M, N]-sized besides dy):
    dxa = s·dy·B            [M, R]
    dB  = s·dyᵀ·xa          [N, R]
    dA  = dxaᵀ·x̃            [R, K]
    dx  = dy·W  (+ dxa·A, added in place when there is no dropout; with dropout it is x̃'s gradient)
Saved for backward: x (and x̃ with dropout), xa — the tensors peft's autograd graph keeps, so activation
memory is unchanged; the saving is the two transient [M, N] tensors and their memory traffic.
16-bit inputs multiply on tensor cores with fp32 accumulation; Triton's CPU interpreter has no 16-bit dot, so
there the tiles are widened to fp32 first (the loads, masks and stores under test are the same).
"""

import torch

from ._triton import SUPPORTED_DTYPES, interpreter_on, lazy_jit, next_pow2, tl, triton_can_run

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
MAX_RANK = 128  # the epilogue holds a [BLOCK_M, rank] and a [rank, BLOCK_N] tile in registers


@lazy_jit
def _lora_fwd(X, W, XA, B, BIAS, Y, M, N, K, R, scale,
              sxm, sxk, swn, swk, sam, sar, sbn, sbr, sym, syn,
              HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a @jit helper: see _triton.py
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(X + rm64[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn64[None, :] * swn + rk[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:  # fp32 products, as torch's default (no TF32) matmul
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:  # 16-bit tensor-core products, fp32 accumulation
            acc += tl.dot(x, w)
    # epilogue: the low-rank update of this tile, s · xa[rm, :] · B[rn, :]ᵀ
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    xa = tl.load(XA + rm64[:, None] * sam + rr[None, :] * sar, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(B + rn64[None, :] * sbn + rr[:, None] * sbr, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    if FP32_DOT:
        low = tl.dot(xa.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        low = tl.dot(xa, b)
    acc += scale * low
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * sym + rn64[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def lora_linear_reference(x, weight, lora_a, lora_b, scale: float, bias=None, x_dropped=None):
    """peft's LoRA Linear: base(x) + lora_B(lora_A(dropout(x))) · scaling."""
    xd = x if x_dropped is None else x_dropped
    y = torch.nn.functional.linear(x, weight, bias)
    return y + torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_a), lora_b) * scale


class LoRALinearFunction(torch.autograd.Function):
    """(x [M, K], x̃ [M, K] or None, W, A, B, bias, s) -> y [M, N]; every tensor in one dtype."""

    @staticmethod
    def forward(ctx, x, x_dropped, weight, lora_a, lora_b, bias, scale):
        xd = x if x_dropped is None else x_dropped
        xa = xd @ lora_a.t()  # [M, R]
        M, K = x.shape
        N, R = weight.shape[0], lora_a.shape[0]
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        if M and N:
            grid = (-(-M // BLOCK_M), -(-N // BLOCK_N))
            _lora_fwd[grid](x, weight, xa, lora_b, bias if bias is not None else y, y, M, N, K, R, float(scale),
                            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0),
                            xa.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
                            HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32 or interpreter_on(),
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=max(16, next_pow2(R)),
                            num_warps=4)
        ctx.save_for_backward(x, x_dropped, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_dropped, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scale
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dxa = (dy @ lora_b) * s  # [M, R]
        dx = dxd = dw = da = db = dbias = None
        if need[0] or need[1]:
            dx = dy @ weight if need[0] else None
            if x_dropped is None:
                if dx is not None:
                    dx.addmm_(dxa, lora_a)  # one [M, K] buffer for both paths
            elif need[1]:
                dxd = dxa @ lora_a
        if need[2]:
            dw = dy.t() @ x
        if need[3]:
            da = dxa.t() @ (x if x_dropped is None else x_dropped)
        if need[4]:
            db = (dy.t() @ xa) * s
        if ctx.has_bias and need[5]:
            dbias = dy.sum(0)
        return dx, dxd, dw, da, db, dbias, None


def lora_supported(x, weight, lora_a, lora_b, bias=None) -> str | None:
    """Why the Triton kernel cannot take these tensors, or None when it can."""
    tensors = [t for t in (x, weight, lora_a, lora_b, bias) if t is not None]
    if not triton_can_run(*tensors):
        return f"tensors on {x.device.type} where Triton cannot run"
    if any(t.dtype not in SUPPORTED_DTYPES for t in tensors):
        return f"unsupported dtypes {sorted({str(t.dtype) for t in tensors})}"
    if weight.dim() != 2 or weight.numel() == 0 or hasattr(weight, "ds_id"):
        return "the base weight is not a materialised matrix (quantized or ZeRO-3 partitioned)"
    if lora_a.shape[0] > MAX_RANK:
        return f"rank {lora_a.shape[0]} > {MAX_RANK}"
    if lora_a.shape[1] != weight.shape[1] or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        return f"shape mismatch: W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
    return None


def lora_linear(x, weight, lora_a, lora_b, scale: float, bias=None, x_dropped=None):
    """x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ (+ bias) over the last dimension of x: the Triton kernel when supported, else the
    reference. Under autocast the GEMMs run in the autocast dtype, as F.linear's would."""
    why = lora_supported(x, weight, lora_a, lora_b, bias)
    if why is not None:
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias, x_dropped)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    lead, K = x.shape[:-1], x.shape[-1]

    def prep(t):
        return None if t is None else t.to(dtype)

    x2 = x.reshape(-1, K).to(dtype)
    xd2 = None if x_dropped is None else x_dropped.reshape(-1, K).to(dtype)
    with torch.autocast(device, enabled=False):
        y = LoRALinearFunction.apply(x2, xd2, prep(weight), prep(lora_a), prep(lora_b), prep(bias), scale)
    return y.reshape(*lead, weight.shape[0])
