"""Where Triton can run, and a `jit` that decides compiled-or-interpreted when a kernel is first launched.

`triton.jit` picks the interpreter (TRITON_INTERPRET=1) at decoration time. Our kernels may be imported
before a test sets the variable (e.g. through unitrain.model), so `lazy_jit` defers the decoration to
the first launch and keeps one build per mode. Without Triton the modules still import: the kernel
bodies are never run and every caller falls back to its torch reference.
"""

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    # Reductions go through tl.reduce with the standard combine functions instead of tl.sum / tl.max:
    # those are @jit functions decorated when triton is imported, so if triton was imported before
    # TRITON_INTERPRET=1 was set the interpreter cannot call them; it does recognise these combiners.
    SUM = tl.standard._sum_combine
    MAX = tl.standard._elementwise_max
except ImportError:  # CPU install without the `triton` extra
    triton = None
    tl = SimpleNamespace(constexpr=int)  # only used in kernel signatures, never executed
    HAS_TRITON = False
    SUM = MAX = None

# Triton's float types for the floating dtypes our kernels accept (others fall back to the reference).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives where a Triton kernel can read it: CUDA, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    interp = interpreter_on()
    for t in tensors:
        if t.is_cuda:
            continue
        if interp and t.device.type == "cpu":
            continue
        return False
    return True


def triton_unavailable_reason() -> str | None:
    """Why Triton kernels cannot run on this machine, or None when they can (on CUDA or the interpreter)."""
    if not HAS_TRITON:
        return "the 'triton' package is not installed"
    if interpreter_on():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    return None


class lazy_jit:
    """`triton.jit` applied at first launch; `kernel[grid](...)` works as with a JITFunction."""

    def __init__(self, fn):
        self.fn = fn
        self._builds = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def build(self):
        if not HAS_TRITON:
            raise RuntimeError(f"{self.__name__}: Triton is not installed")
        mode = interpreter_on()
        if mode not in self._builds:
            self._builds[mode] = triton.jit(self.fn)
        return self._builds[mode]

    def __getitem__(self, grid):
        return self.build()[grid]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel over `block` elements: ~8-16 elements per thread."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def rows_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` as a [rows, n] tensor whose last dimension has unit stride (a view when possible)."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def multiprocessor_count(device: torch.device) -> int:
    """Programs for a persistent grid: the SM count on CUDA, a handful under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
