"""Compute model: FLOPs per token and predicted step time.

FLOPs per token (PaLM's accounting, Chowdhery et al. 2022, appendix B), with Ψmm the parameters that take
part in a matmul (every decoder linear + the output projection; the embedding lookup is free):
- full:        6·Ψmm + 12·L·hq·s                (forward 2Ψmm, backward 4Ψmm; attention 4·L·hq·s per pass)
- LoRA/QLoRA:  4·Ψmm + 6·Ψlora + 12·L·hq·s      (no weight gradients through the frozen base)
- recomputation adds one forward of the checkpointed fraction: + f·(2·Ψmm + 4·L·hq·s)
- one forward (evals, scoring): 2·Ψmm (+ 2·Ψlora) + 4·L·hq·s, whatever the method: no backward, no recomputation
The budget counts executed FLOPs, recomputation included. "Per token" here means per forwarded position (a
slot): padding inside a batch costs the same as a real token.

Step time = FLOPs / (N · peak · MFU) + exposed communication + offload costs. The MFU prior comes from the
accelerator table (llm-foundry measurements) and is scaled down for small micro-batches and QLoRA's
dequantisation; calibration replaces it with a measured factor.
"""

from __future__ import annotations

from dataclasses import dataclass

from unitrain.plan.schema import Execution
from unitrain.plan.shape import ModelShape

# Collective bandwidths are the target's: spec.intra_node_bw (per GPU inside a node: NVLink or PCIe) and
# spec.inter_node_bw (between nodes), from the hardware table (unitrain/hardware.json) via resources.py; on CPU
# gloo gets ~1 GB/s. Offload and CPU Adam: priors, not measurements (PCIe 4/5 x16 ~25 GB/s effective).
PCIE_BW = 25e9
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed's CPUAdam (AVX) on a multi-core host, per node
QLORA_SLOWDOWN = 0.7  # NF4 dequantisation per matmul: QLoRA runs at ~70 % of LoRA's speed
OVERLAP = {0: 0.7, 1: 0.7, 2: 0.7, 3: 0.5}  # fraction of gradient/parameter traffic hidden behind compute


def checkpointed_fraction(checkpointing, layers: int) -> float:
    if checkpointing in ("off", None, 0):
        return 0.0
    if checkpointing == "full":
        return 1.0
    return -(-layers // int(checkpointing)) / layers


def flops_per_token(shape: ModelShape, method: str, seq_len: int, checkpointing="off", lora_params: int = 0) -> float:
    mm, attn = shape.matmul_params, shape.num_layers * shape.q_dim * seq_len
    if method == "full":
        f = 6 * mm + 12 * attn
    else:
        f = 4 * mm + 6 * lora_params + 12 * attn
    return f + checkpointed_fraction(checkpointing, shape.num_layers) * (2 * mm + 4 * attn)


def forward_flops_per_token(shape: ModelShape, seq_len: int, lora_params: int = 0) -> float:
    """One forward pass per position: what an eval (or a scoring pass) costs."""
    return 2 * shape.matmul_params + 2 * lora_params + 4 * shape.num_layers * shape.q_dim * seq_len


def size_efficiency(tokens_per_micro_batch: int) -> float:
    """Matmuls with few rows run below peak: × (T/4096)^0.15 below 4096 tokens per micro-batch (a prior)."""
    return min(1.0, (max(1, tokens_per_micro_batch) / 4096) ** 0.15)


@dataclass
class StepTime:
    total: float
    compute: float
    communication: float
    offload: float
    mfu: float


def step_time(shape: ModelShape, st: Execution, seq_len: int, global_batch: int, flops_token: float, spec,
              trainable: int) -> StepTime:
    """Seconds per optimizer step for `global_batch` sequences over spec.world_size ranks."""
    N = spec.world_size
    mfu = spec.mfu * size_efficiency(st.micro_batch_size * seq_len) * (QLORA_SLOWDOWN if st.method == "qlora" else 1)
    compute = flops_token * global_batch * seq_len / (N * spec.peak_flops * mfu)
    w = 4 if st.dtype == "float32" else 2
    bw = spec.inter_node_bw if spec.nodes > 1 and not spec.on_cpu else spec.intra_node_bw
    frac = (N - 1) / N
    comm = 0.0
    if N > 1:
        if st.zero_stage == 3:  # all-gather in forward and backward + reduce-scatter, every micro-batch
            comm = st.grad_accum * 3 * w * shape.total_params * frac / bw
        else:  # all-reduce (DDP) or reduce-scatter + all-gather (ZeRO-1/2) once per step
            comm = 2 * w * trainable * frac / bw
    exposed = comm * (1 - OVERLAP[st.zero_stage])
    offload = 0.0
    if st.offload_optimizer:  # gradients down, parameters up over PCIe + CPU Adam shared by the node's ranks
        offload += 2 * w * trainable / N / PCIE_BW
        offload += trainable / N * max(1, spec.gpus_per_node) / CPU_ADAM_PARAMS_PER_S
    if st.offload_params:  # parameters fetched from host memory in forward and backward, every micro-batch
        offload += st.grad_accum * 2 * w * shape.total_params / N / PCIE_BW
    return StepTime(compute + exposed + offload, compute, exposed, offload, mfu)
