"""Rotary position embedding on q and k in one launch (HF layout and rotate_half convention).

q: [b, n_q, s, d], k: [b, n_kv, s, d] (any strides with a unit last stride: HF passes the transposed
projection views), cos/sin: [b or 1, s, d] as HF's rotary module returns them. With x = [x1, x2]
split at d/2:
    y1 = x1·cos1 − x2·sin1,   y2 = x2·cos2 + x1·sin2
and the backward is the same map with (sin1, sin2) → (−sin2, −sin1):
    dx1 = dy1·cos1 + dy2·sin2,   dx2 = dy2·cos2 − dy1·sin1.
One program per (batch, block of positions) handles all q heads and all k heads (GQA: n_q ≠ n_kv);
math in fp32.
Memory: like eager (measured), autograd keeps only cos and sin, shared by every layer; the gain is time
and the transient q/k-sized temporaries of eager (q·cos, rotate_half(q), its product with sin, and the
same again in backward).
"""

import torch

from ._triton import SUPPORTED_DTYPES, lazy_jit, next_pow2, tl, triton_can_run

MAX_HEAD_DIM = 1024


@lazy_jit
def _rope_kernel(Q, K, COS, SIN, QO, KO,
                 q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss, c_sb, c_ss,
                 seq_len, n_qh, n_kh, half, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    # tiles are [positions, heads, half head_dim]
    seq_blocks = (seq_len + BLOCK_S - 1) // BLOCK_S
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_blocks
    s = (pid % seq_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    sd_ok = (s < seq_len) & (d < half)
    cs = COS + b * c_sb + s * c_ss + d
    sn = SIN + b * c_sb + s * c_ss + d
    c1 = tl.load(cs, mask=sd_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cs + half, mask=sd_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sn, mask=sd_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sn + half, mask=sd_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1

    hq = tl.arange(0, BLOCK_QH)[None, :, None]
    mq = sd_ok & (hq < n_qh)
    src = Q + b * q_sb + s * q_ss + hq * q_sh + d
    x1 = tl.load(src, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mq, other=0.0).to(tl.float32)
    dst = QO + b * qo_sb + s * qo_ss + hq * qo_sh + d
    tl.store(dst, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty), mask=mq)
    tl.store(dst + half, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_KH)[None, :, None]
    mk = sd_ok & (hk < n_kh)
    src = K + b * k_sb + s * k_ss + hk * k_sh + d
    x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mk, other=0.0).to(tl.float32)
    dst = KO + b * ko_sb + s * ko_ss + hk * ko_sh + d
    tl.store(dst, (x1 * c1 - x2 * s1).to(KO.dtype.element_ty), mask=mk)
    tl.store(dst + half, (x2 * c2 + x1 * s2).to(KO.dtype.element_ty), mask=mk)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF's apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _cos_sin_3d(cos, sin, batch):
    """cos/sin as [batch, s, d] views (stride 0 over a broadcast batch)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = _unit_last(cos.expand(batch, -1, -1)), _unit_last(sin.expand(batch, -1, -1))
    if cos.stride() != sin.stride():  # the kernel reads both with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _launch(q, k, cos, sin, backward, q_dtype, k_dtype):
    b, n_qh, s, d = q.shape
    n_kh = k.shape[1]
    qo, ko = torch.empty_like(q, dtype=q_dtype), torch.empty_like(k, dtype=k_dtype)  # keeps q's strides
    if qo.stride(-1) != 1:
        qo = torch.empty(q.shape, dtype=q_dtype, device=q.device)
    if ko.stride(-1) != 1:
        ko = torch.empty(k.shape, dtype=k_dtype, device=k.device)
    if b * s == 0:
        return qo, ko
    half = d // 2
    block_d = next_pow2(half)
    bq, bk = next_pow2(n_qh), next_pow2(n_kh)
    # one position per program at Llama sizes ((32 + 8) heads × 64), several (≤ 4096 elements) when small
    fit = max(1, 4096 // ((bq + bk) * block_d))  # bq + bk need not be a power of two (4 + 2 heads)
    block_s = min(next_pow2(s), 1 << (fit.bit_length() - 1))  # tl.arange needs a power of two
    warps = 8 if (bq + bk) * block_d * block_s >= 8192 else 4
    _rope_kernel[(b * -(-s // block_s),)](
        q, k, cos, sin, qo, ko,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), s, n_qh, n_kh, half,
        BACKWARD=backward, BLOCK_S=block_s, BLOCK_QH=bq, BLOCK_KH=bk, BLOCK_D=block_d, num_warps=warps)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """q, k: [b, heads, s, d]; cos, sin: [b or 1, s, d] (no gradient flows to cos/sin)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = _cos_sin_3d(cos, sin, q.shape[0])
        ctx.save_for_backward(cos, sin)
        ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)
        # output dtypes as HF's q * cos: fp32 cos (autocast with an fp32 residual stream) gives fp32 q/k
        return _launch(_unit_last(q), _unit_last(k), cos, sin, False,
                       torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = _unit_last(dq) if dq is not None else None
        dk = _unit_last(dk) if dk is not None else None
        if dq is None:  # an unused output has a zero gradient
            dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=cos.device)
        if dk is None:
            dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=cos.device)
        gq, gk = _launch(dq, dk, cos, sin, True, ctx.q_meta[1], ctx.k_meta[1])
        return gq, gk, None, None


def rope_supported(q, k, cos, sin, unsqueeze_dim: int = 1) -> str | None:
    """Why the Triton kernel cannot take these tensors, or None when it can."""
    if unsqueeze_dim not in (1, 2):
        return f"unsqueeze_dim={unsqueeze_dim}"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() not in (2, 3) or sin.shape != cos.shape:
        return f"shapes q{tuple(q.shape)} k{tuple(k.shape)} cos{tuple(cos.shape)}"
    if not triton_can_run(q, k, cos, sin):
        return f"tensors on {q.device.type} where Triton cannot run"
    if any(t.dtype not in SUPPORTED_DTYPES for t in (q, k, cos, sin)):
        return "dtype not supported"
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require grad"
    d = q.shape[-1]
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    if (d % 2 or d > MAX_HEAD_DIM or k.shape[-1] != d or cos.shape[-1] != d
            or q.shape[seq_dim] != cos.shape[-2] or k.shape[seq_dim] != cos.shape[-2]
            or k.shape[0] != q.shape[0] or (cos.dim() == 3 and cos.shape[0] not in (1, q.shape[0]))):
        return f"shapes q{tuple(q.shape)} k{tuple(k.shape)} cos{tuple(cos.shape)} (partial rotary or odd head_dim)"
    return None


def apply_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for HF's apply_rotary_pos_emb: the Triton kernel when supported, else the reference."""
    if rope_supported(q, k, cos, sin, unsqueeze_dim) is not None:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:  # [b, s, h, d]: the same memory seen as [b, h, s, d]
        qo, ko = RoPEFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return RoPEFunction.apply(q, k, cos, sin)
