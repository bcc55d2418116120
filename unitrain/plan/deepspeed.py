"""The one DeepSpeed config: what a ZeRO plan passes to `deepspeed.initialize`, as a pure function of the plan.

`unitrain run` hands exactly this dict to the engine and `unitrain plan --deepspeed-config` writes exactly this
dict, so a plan previewed is the plan executed. The memory model (memory.py) assumes these settings:

- batch: train_batch_size = micro × accumulation × ranks;
- precision: bf16/fp16 by the plan's compute dtype (fp32 master weights live in the ZeRO optimizer);
- buckets: h² elements, at least 1M (HF/Accelerate's 'auto' rule), counted as communication buffers;
- optimizer and LR schedule: none in the config. unitrain passes its own torch AdamW (or bitsandbytes
  AdamW8bit / PagedAdamW8bit) and a LambdaLR as client objects, with the same parameter groups as the torch
  path (no weight decay on 1-D tensors); with optimizer offload DeepSpeed steps that torch optimizer on the
  host (`zero_force_ds_cpu_optimizer: false`: no DeepSpeedCPUAdam C++ build);
- ZeRO-3: `memory_efficient_linear: false`. DeepSpeed's default replaces torch.nn.functional.linear
  process-wide with a function that also saves the input of frozen linears (LoRA: T·(2h + I) more bytes per
  layer than counted); plain F.linear works under ZeRO-3, its saved weight is re-gathered for backward.
"""

from __future__ import annotations


def bucket_elements(hidden_size: int) -> int:
    """DeepSpeed reduce/allgather bucket (elements): h², HF/Accelerate's 'auto' rule, at least 1M."""
    return max(int(hidden_size) ** 2, 1_000_000)


def engine_config(execution, *, hidden_size: int, on_cpu: bool, max_grad_norm: float) -> dict | None:
    """The engine config for a ZeRO plan (None for zero_stage 0: plain torch runs it)."""
    s = execution
    if s.zero_stage == 0:
        return None
    bucket = bucket_elements(hidden_size)
    zero: dict = {"stage": s.zero_stage, "overlap_comm": not on_cpu, "contiguous_gradients": True,
                  "reduce_bucket_size": bucket}
    if s.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = bucket
    if s.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(0.9 * bucket),
                     "stage3_param_persistence_threshold": 10 * hidden_size,
                     "stage3_gather_16bit_weights_on_model_save": True, "memory_efficient_linear": False})
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    return {
        "train_batch_size": s.global_batch_size,
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "gradient_clipping": float(max_grad_norm),
        "bf16": {"enabled": s.dtype == "bfloat16"},
        "fp16": {"enabled": s.dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client optimizer (torch AdamW / bitsandbytes 8-bit)
        "zero_force_ds_cpu_optimizer": False,  # offload steps the client torch AdamW on the host
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


CLIENT_OPTIMIZER_NOTE = ("the config names no optimizer and no scheduler: unitrain passes its own torch AdamW (or "
                         "bitsandbytes 8-bit AdamW) and LambdaLR to deepspeed.initialize(optimizer=..., "
                         "lr_scheduler=...); a script of your own must do the same")
