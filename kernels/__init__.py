"""unitrain's Triton kernels (import name `unitrain_kernels`), each with its torch reference, and the
patcher that puts them into transformers causal LMs.

Every kernel is a torch.autograd.Function with a Triton forward (and backward, except the fused LoRA linear,
whose backward is cuBLAS GEMMs); the lower-case function beside it (`rmsnorm`, `apply_rope`, `swiglu`,
`fused_linear_cross_entropy`, `lora_linear`) uses the kernel where Triton can run on the given tensors (CUDA,
or CPU with TRITON_INTERPRET=1) and the reference elsewhere.
"""

from .fused_ce import (FusedLinearCrossEntropyFunction, fused_linear_cross_entropy,
                       linear_cross_entropy_reference)
from .lora import LoRALinearFunction, lora_linear, lora_linear_reference
from .patch import KERNEL_NAMES, KernelError, PatchReport, patch_model, patched_kernel, unpatch_model
from .rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference
from .rope import RoPEFunction, apply_rope, rope_reference
from .swiglu import SwiGLUFunction, swiglu, swiglu_reference

__all__ = [
    "KERNEL_NAMES", "KernelError", "PatchReport", "patch_model", "unpatch_model", "patched_kernel",
    "RMSNormFunction", "rmsnorm", "rmsnorm_reference",
    "RoPEFunction", "apply_rope", "rope_reference",
    "SwiGLUFunction", "swiglu", "swiglu_reference",
    "FusedLinearCrossEntropyFunction", "fused_linear_cross_entropy", "linear_cross_entropy_reference",
    "LoRALinearFunction", "lora_linear", "lora_linear_reference",
]
