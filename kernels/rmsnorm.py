"""RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + w), a row (or a tile of short rows) per Triton
program, statistics in fp32.

Memory: autograd keeps only the input x (which the caller keeps anyway) and one fp32 rstd per row.
HF's eager RMSNorm keeps an fp32 copy of x, the normalised fp32 tensor and its cast (≈ 10 bytes per
element for bf16 input) — about 2 + 4/h bytes per element here.

Casting follows HF: Llama-style (`cast_before_weight=True`) rounds the normalised row to the input
dtype and multiplies by the weight in the promoted dtype; Gemma-style (`offset=1.0`,
`cast_before_weight=False`) multiplies by (1 + w) in fp32 and casts once.
The weight gradient is reduced across rows by a persistent grid: each program accumulates its rows
into an fp32 partial, then torch sums the (programs × h) partials.
"""

import torch

from ._triton import (SUM, SUPPORTED_DTYPES, lazy_jit, multiprocessor_count, next_pow2, rows_2d, tl,
                      triton_can_run, warps_for)

MAX_COLS = 65536  # one row must fit one program's registers (fp32, 32 warps)


@lazy_jit
def _rmsnorm_fwd(X, Y, W, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset,
                 CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x * x, 1, SUM) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    xn = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        xn = xn.to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (xn * w[None, :]).to(Y.dtype.element_ty), mask=mask)


@lazy_jit
def _rmsnorm_bwd(DY, DX, X, W, RSTD, DW_PARTIAL, stride_dy, stride_dx, stride_x, n_rows, n_cols, offset,
                 rows_per_program, CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    # dx = rstd · (dxn − xn · mean(dxn · xn)) with dxn = dy · (offset + w);  dw = Σ_rows dy · xn
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw = tl.full([BLOCK], 0.0, tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        xn = x * rstd
        dxn = dy * w[None, :]
        dx = rstd * (dxn - xn * (tl.reduce(dxn * xn, 1, SUM) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if CAST_BEFORE_WEIGHT:
            xn = xn.to(X.dtype.element_ty).to(tl.float32)
        dw += tl.reduce(dy * xn, 0, SUM)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)


def _tiles(n_cols):
    """(BLOCK, BLOCK_ROWS, warps): a row per program from 4096 columns up, several rows (≤ 4096 elements)
    per program below — Qwen3's per-head q/k norms have 128 columns and b·s·heads rows."""
    block = next_pow2(n_cols)
    block_rows = max(1, 4096 // block)
    return block, block_rows, warps_for(block * block_rows)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                      cast_before_weight: bool = True) -> torch.Tensor:
    """HF's LlamaRMSNorm (cast_before_weight) or GemmaRMSNorm (offset=1, not cast_before_weight)."""
    xf = x.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        w = weight + offset if offset else weight
        return w * xn.to(x.dtype)
    return (xn * (offset + weight.float())).type_as(x)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset=0.0, cast_before_weight=True):
        n = x.shape[-1]
        x2 = rows_2d(x, n)
        weight = weight.contiguous()
        rows = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype
        y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, block_rows, warps = _tiles(n)
        if rows:
            _rmsnorm_fwd[(-(-rows // block_rows),)](x2, y, weight, rstd, x2.stride(0), y.stride(0), rows, n,
                                                    float(eps), float(offset),
                                                    CAST_BEFORE_WEIGHT=bool(cast_before_weight),
                                                    BLOCK_ROWS=block_rows, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.cast_before_weight, ctx.x_shape = float(offset), bool(cast_before_weight), x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = rows_2d(dy, n)
        dx = torch.empty((rows, n), dtype=x2.dtype, device=x2.device)
        programs = max(1, min(rows, multiprocessor_count(x2.device)))
        rows_per_program = -(-rows // programs)
        partial = torch.zeros((programs, n), dtype=torch.float32, device=x2.device)
        block, block_rows, warps = _tiles(n)
        if rows:
            _rmsnorm_bwd[(programs,)](dy2, dx, x2, weight, rstd, partial, dy2.stride(0), dx.stride(0), x2.stride(0),
                                      rows, n, ctx.offset, rows_per_program,
                                      CAST_BEFORE_WEIGHT=ctx.cast_before_weight, BLOCK_ROWS=block_rows,
                                      BLOCK=block, num_warps=warps)
        dw = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None, None, None


def rmsnorm_supported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these tensors, or None when it can."""
    if not triton_can_run(x, weight):
        return f"tensors on {x.device.type} where Triton cannot run"
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}/{weight.dtype} not supported"
    if x.shape[-1] > MAX_COLS or weight.shape != (x.shape[-1],):
        return f"hidden size {x.shape[-1]} (weight {tuple(weight.shape)}) not supported (max {MAX_COLS})"
    return None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
            cast_before_weight: bool = True) -> torch.Tensor:
    """The Triton RMSNorm when it can run on these tensors, else the torch reference."""
    if rmsnorm_supported(x, weight) is None:
        return RMSNormFunction.apply(x, weight, eps, offset, cast_before_weight)
    return rmsnorm_reference(x, weight, eps, offset, cast_before_weight)
