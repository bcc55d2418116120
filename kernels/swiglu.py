"""SwiGLU: c = silu(a) · b for the gate projection a and the up projection b, elementwise in fp32.

Backward recomputes σ(a) instead of saving silu(a):
    db = dc · a·σ(a),   da = dc · b · σ(a)·(1 + a·(1 − σ(a))).
Memory: autograd keeps a and b only (2 tensors of b·s·i); eager SiLU-then-mul keeps a, silu(a) and b.
"""

import torch
import torch.nn.functional as F

from ._triton import SUPPORTED_DTYPES, lazy_jit, tl, triton_can_run

BLOCK = 1024


@lazy_jit
def _swiglu_fwd(A, B, C, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + offs, (a * 1.0 / (1.0 + tl.exp(-a)) * b).to(C.dtype.element_ty), mask=mask)


@lazy_jit
def _swiglu_bwd(DC, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    silu = a * sig
    tl.store(DB + offs, (dc * silu).to(DB.dtype.element_ty), mask=mask)
    tl.store(DA + offs, (dc * b * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """HF's `act_fn(gate_proj(x)) * up_proj(x)` with act_fn = SiLU."""
    return F.silu(a) * b


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty_like(a)
        n = a.numel()
        if n:
            _swiglu_fwd[(-(-n // BLOCK),)](a, b, c, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        if n:
            _swiglu_bwd[(-(-n // BLOCK),)](dc, a, b, da, db, n, BLOCK=BLOCK, num_warps=4)
        return da, db


def swiglu_supported(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these tensors, or None when it can."""
    if not triton_can_run(a, b):
        return f"tensors on {a.device.type} where Triton cannot run"
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype not in SUPPORTED_DTYPES:
        return f"gate/up mismatch or unsupported: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    return None


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) · b: the Triton kernel when supported, else the reference."""
    if swiglu_supported(a, b) is None:
        return SwiGLUFunction.apply(a, b)
    return swiglu_reference(a, b)
