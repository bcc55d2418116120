"""Fused linear + cross-entropy: loss(x·Wᵀ + bias, target) without the [tokens, vocab] logits.

Tokens are processed in chunks of C rows. For each chunk torch computes logits = x_c·Wᵀ (in x's
dtype, fp32 accumulation inside the GEMM — exactly what HF's lm_head produces), then one Triton
program per row makes two passes over the vocabulary in fp32: an online max / log-sum-exp (and the
row's loss), then the gradient softmax − one_hot (label smoothing, soft-capping), scaled for the
reduction, written over the logits in place. torch then forms grad_x_c = g·W and accumulates
grad_W += gᵀ·x_c. The gradients are computed in the forward pass (like Liger), so backward only scales
them by the incoming gradient — the function can be backpropagated once.

Memory (N tokens, hidden h, vocabulary V, e = bytes per element of x):
  eager HF: N·V·(e + 4 + 4 + e) — logits, fp32 upcast, fp32 softmax grad, its cast — at its peak;
  fused:    C·V·e for the chunk's logits/grad + N·h·e for grad_x + grad_W, which is
            V·h·4 with fp32 accumulation of a 16-bit W (torch ≥ 2.8 on CUDA adds each chunk's GEMM
            into the fp32 sum in its epilogue; elsewhere + V·h·e for a 16-bit GEMM result),
            V·h·e with accumulation in W's dtype (Liger's default), nothing for a frozen W (LoRA);
            the fp32 sum is cast to W's dtype at the end of forward (V·h·e kept for backward).
Time: the same three GEMMs as eager (x·Wᵀ, g·W, gᵀ·x) plus two reads and one write of the chunk's
logits; accumulating grad_W reads and writes the V·h sum once per chunk (4 bytes/element in fp32).
"""

import torch
import torch.nn.functional as F

from ._triton import MAX, SUM, SUPPORTED_DTYPES, lazy_jit, next_pow2, tl, triton_can_run, warps_for

_FP32_ADDMM_OK: dict[str, bool] = {}  # device -> addmm(out_dtype=fp32) accumulates 16-bit GEMMs correctly
CHUNK_BYTES = 256 * 2**20  # logits of one chunk: C·V·e bytes at most (256 MiB: C=1024 at V=128k, bf16)
MAX_BLOCK = 8192


@lazy_jit
def _ce_rows(LOGITS, stride_l, TARGET, LOSS, n_cols, ignore_index, grad_scale, label_smoothing, softcap,
             HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr):
    # loss = lse(z) − (1 − ε)·z_y − ε/V·Σz;  dloss/dz = softmax(z) − (1 − ε)·[j = y] − ε/V
    # with z = cap·tanh(l / cap) when soft-capping (dz/dl = 1 − (z / cap)²), else z = l.
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_l
    y = tl.load(TARGET + row)
    if y == ignore_index:
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            tl.store(ptr + cols, tl.full([BLOCK], 0.0, tl.float32).to(LOGITS.dtype.element_ty),
                     mask=cols < n_cols)
        tl.store(LOSS + row, 0.0)
        return

    m = float("-inf")
    d = 0.0
    z_sum = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:  # tanh(u) = 1 − 2 / (exp(2u) + 1): libdevice's tanh is absent in the interpreter
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
        if HAS_SMOOTHING:
            z_sum += tl.reduce(tl.where(mask, z, 0.0), 0, SUM)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(z, 0, MAX))
        d = d * tl.exp(m - m_new) + tl.reduce(tl.exp(z - m_new), 0, SUM)
        m = m_new
    lse = m + tl.log(d)

    z_y = tl.load(ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z_y / softcap) + 1.0))
    loss = lse - (1.0 - label_smoothing) * z_y
    if HAS_SMOOTHING:
        loss -= label_smoothing / n_cols * z_sum

    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
        g = tl.exp(z - lse)
        if HAS_SMOOTHING:
            g -= label_smoothing / n_cols
        g = tl.where(cols == y, g - (1.0 - label_smoothing), g)
        if HAS_SOFTCAP:
            g = g * (1.0 - (z / softcap) * (z / softcap))
        tl.store(ptr + cols, (g * grad_scale).to(LOGITS.dtype.element_ty), mask=mask)
    tl.store(LOSS + row, loss)


def linear_cross_entropy_reference(x, weight, target, bias=None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0,
                                   softcap: float | None = None) -> torch.Tensor:
    """HF's path: logits = lm_head(x) in x's dtype, upcast to fp32, optional soft-cap, cross-entropy."""
    logits = F.linear(x, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def _fp32_addmm_works(device: torch.device) -> bool:
    """torch ≥ 2.8 on CUDA adds a bf16/fp16 GEMM into an fp32 matrix in the GEMM's epilogue
    (addmm(..., out_dtype=fp32, out=acc)); checked once per device on a small case, else we fall back
    to a 16-bit GEMM result added to the fp32 sum."""
    key = str(device)
    if key not in _FP32_ADDMM_OK:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(64, 32, device=device, generator=g).to(torch.bfloat16)
                b = torch.randn(32, 48, device=device, generator=g).to(torch.bfloat16)
                acc = torch.randn(64, 48, device=device, generator=g)
                want = acc + a.float() @ b.float()
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                ok = False
        _FP32_ADDMM_OK[key] = ok
    return _FP32_ADDMM_OK[key]


def default_chunk_tokens(n_tokens: int, vocab: int, elem_bytes: int) -> int:
    """Largest power of two ≤ CHUNK_BYTES / (V·e), at least 16 and at most n_tokens."""
    c = max(16, CHUNK_BYTES // max(1, vocab * elem_bytes))
    c = 1 << (c.bit_length() - 1)
    return max(1, min(n_tokens, c))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """x: [N, h], weight: [V, h], target: [N] (int), bias: [V] or None → scalar fp32 loss."""

    @staticmethod
    def forward(ctx, x, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                softcap=None, chunk_tokens=None, grad_weight_fp32=True, with_grads=True):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        x = x.contiguous()  # grad_x is written chunk by chunk through out= views
        n, h = x.shape
        v = weight.shape[0]
        # needs_input_grad stays True under torch.no_grad: `with_grads` (the caller's grad mode) says otherwise
        need_x, need_w = with_grads and ctx.needs_input_grad[0], with_grads and ctx.needs_input_grad[1]
        need_b = with_grads and bias is not None and ctx.needs_input_grad[3]
        target = target.reshape(-1)
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= v))
        n_valid, n_bad = (int(t) for t in torch.stack([valid.sum(), bad.sum()]).tolist())
        if n_bad:
            raise ValueError(f"{n_bad} target(s) outside [0, {v}) that are not ignore_index={ignore_index}")
        # mean: the gradient carries 1/n_valid (torch gives nan loss with no valid token; so do we)
        grad_scale = 1.0 / n_valid if (reduction == "mean" and n_valid) else 1.0

        grad_x = torch.empty_like(x) if need_x else None
        accum_dtype = torch.float32 if grad_weight_fp32 else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=accum_dtype, device=x.device) if need_w else None
        mixed = need_w and accum_dtype != weight.dtype  # fp32 sum of 16-bit GEMMs
        fused_accum = mixed and _fp32_addmm_works(x.device)
        gemm_out = (torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
                    if mixed and not fused_accum else None)
        grad_b = torch.zeros(v, dtype=torch.float32, device=x.device) if need_b else None
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)

        chunk = chunk_tokens or default_chunk_tokens(n, v, x.element_size())
        block = min(MAX_BLOCK, next_pow2(v))
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            x_c = x[start:end]
            logits = torch.addmm(bias, x_c, weight.t()) if bias is not None else torch.mm(x_c, weight.t())
            _ce_rows[(end - start,)](logits, logits.stride(0), target[start:end], loss_rows[start:end], v,
                                     int(ignore_index), float(grad_scale), float(label_smoothing),
                                     float(softcap or 0.0), HAS_SOFTCAP=bool(softcap),
                                     HAS_SMOOTHING=bool(label_smoothing), BLOCK=block,
                                     num_warps=warps_for(block))
            g = logits  # now holds dloss/dlogits for the chunk
            if need_x:
                torch.mm(g, weight, out=grad_x[start:end])
            if need_w:
                if fused_accum:
                    torch.addmm(grad_w, g.t(), x_c, out_dtype=torch.float32, out=grad_w)
                elif gemm_out is not None:
                    grad_w.add_(torch.mm(g.t(), x_c, out=gemm_out))
                else:
                    grad_w.addmm_(g.t(), x_c)
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
            del logits, g

        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / n_valid if n_valid else loss.new_tensor(float("nan"))
        del gemm_out
        ctx.grads = (grad_x,
                     grad_w.to(weight.dtype) if need_w else None,
                     grad_b.to(bias.dtype) if need_b else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused linear cross-entropy computes its gradients in forward and can be "
                               "backpropagated only once; recompute the loss to backpropagate again")
        grads, ctx.grads = ctx.grads, None
        scaled = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads]
        grad_x, grad_w, grad_b = scaled
        return grad_x, grad_w, None, grad_b, None, None, None, None, None, None, None


def fused_ce_supported(x, weight, bias=None) -> str | None:
    """Why the fused path cannot take these tensors, or None when it can."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not triton_can_run(*tensors):
        return f"tensors on {x.device.type} where Triton cannot run"
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"dtypes x {x.dtype} / weight {weight.dtype} not supported (they must match)"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"shapes x{tuple(x.shape)} weight{tuple(weight.shape)}"
    return None


def fused_linear_cross_entropy(x, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, softcap: float | None = None,
                               chunk_tokens: int | None = None, grad_weight_fp32: bool = True) -> torch.Tensor:
    """Cross-entropy of x·Wᵀ + bias against target; x is flattened to [N, h]. Falls back to the reference
    (which materialises the logits) where the Triton kernel cannot run."""
    x2, target = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    if fused_ce_supported(x2, weight, bias) is not None:
        return linear_cross_entropy_reference(x2, weight, target, bias, ignore_index, reduction, label_smoothing,
                                              softcap)
    device = x2.device.type
    if torch.is_autocast_enabled(device):  # as autocast does for F.linear: the GEMMs run in its dtype
        dtype = torch.get_autocast_dtype(device)
        x2, weight = x2.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(x2, weight, target, bias, ignore_index, reduction,
                                                     label_smoothing, softcap, chunk_tokens, grad_weight_fp32,
                                                     torch.is_grad_enabled())
