"""The DeepSpeed execution backend: ZeRO 1-3 (+ CPU offload of optimizer states and parameters) from the Plan.

The trainer's loop is the same as on the torch path (see loop.py): one backward per micro-batch, each loss
already divided by the label tokens of the whole global batch, then one optimizer step. DeepSpeed's idioms
are adapted to it:
- engine.backward(loss) would divide by gradient_accumulation_steps; the loss is already normalised, so
  backward uses scale_wrt_gas=False.
- engine.step() is called after every micro-batch (DeepSpeed counts micro-steps to find the accumulation
  boundary, where ZeRO-2/3 reduce and the optimizer steps). The boundary's step() is deferred to the
  trainer's backend.step(), so `lr` read before it is the LR this update uses, exactly as on the torch path.
- The engine config is the plan's (`plan.execution.deepspeed`, made by unitrain/plan/deepspeed.py): exactly
  what `unitrain plan --deepspeed-config` writes.
- The optimizer is the one build_optimizer makes for the torch path (torch AdamW, bitsandbytes AdamW8bit or
  PagedAdamW8bit) with the same parameter groups (no weight decay on 1-D tensors), handed to DeepSpeed as
  a client optimizer: no DeepSpeed C++ op is compiled, and the update is the torch path's update.
- The LR schedule is the same LambdaLR(schedule), passed as DeepSpeed's lr_scheduler (stepped at the boundary).
- Clipping is DeepSpeed's (gradient_clipping), which scales by max_norm / (norm + 1e-6) like torch's.
Checkpoints are DeepSpeed's own (engine.save_checkpoint into the trainer's atomic folder, every rank writes its
partition). A ZeRO-3 model is exported from a state dict gathered onto rank 0 layer by layer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as td

from unitrain.errors import UnitrainError
from unitrain.train.schedule import Schedule

TAG = "ds"  # DeepSpeed checkpoint sub-folder inside checkpoints/step-N/


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group() -> bool:
    """DeepSpeed needs a process group even for one process: make a single-rank one when no launcher did.

    -> True when this call created it (unitrain.dist.shutdown destroys it at the end of the run)."""
    if td.is_initialized():
        return False
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's sanity check reads it (a launcher would set it)
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    td.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                          timeout=timedelta(minutes=5))
    _forget_deepspeed_groups()
    # One rank has nothing to all-reduce: skip DeepSpeed's CPU shared-memory all-reduce op, a C++ extension that
    # it would otherwise compile on first use (~1 min, and it needs a compiler).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches sub-groups of the world group in module globals; a new group (a second run in the same
    process: tests, notebooks) must not meet the destroyed one's clones."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None


class DeepSpeedBackend:
    """deepspeed.initialize from the Plan; the calls the trainer makes (see torch_backend.TorchBackend)."""

    name = "deepspeed"

    def __init__(self, plan, model, recipe, schedule: Schedule):
        import deepspeed

        from unitrain.train.backends.optimizer import build_optimizer

        s, t = plan.execution, recipe.training
        if s.zero_stage == 3 and recipe.output.merge and s.method != "full":
            raise UnitrainError("output.merge=true cannot merge a LoRA adapter into a ZeRO-3 partitioned model; set "
                                "output.merge=false and merge the exported adapter afterwards "
                                "(PeftModel.from_pretrained(base, 'final').merge_and_unload())")
        self.plan, self.method, self.zero_stage = plan, s.method, s.zero_stage
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the run's own output
        ensure_process_group()
        self.config = copy.deepcopy(s.deepspeed)  # DeepSpeed writes into the dict it is given
        optimizer = build_optimizer(model, s.optimizer, t.lr, t.weight_decay, t.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config, dist_init_required=False)
        self.optimizer = optimizer  # the torch/bnb optimizer; ZeRO (engine.optimizer) drives it over fp32 partitions

    # ------------------------------------------------------------------ the step
    def forward(self, **batch):
        return self.engine(**batch)

    def no_sync(self, last_micro: bool):
        """DeepSpeed skips the reduction itself until the accumulation boundary (its micro-step counter)."""
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer's loss is already a global-batch mean
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # no update: advances DeepSpeed's micro-step counter

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            gas = self.engine.gradient_accumulation_steps()
            raise RuntimeError(f"DeepSpeed is not at an accumulation boundary: the trainer ran a number of micro-"
                               f"batches that is not gradient_accumulation_steps={gas}")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    # ------------------------------------------------------------------ state
    def save(self, folder: Path) -> None:
        """Every rank writes its ZeRO partition (collective); adapters only for LoRA/QLoRA (the base is frozen)."""
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=self.method != "full")

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=self.method == "full",
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder / TAG}")

    def unwrap(self):
        return self.engine.module

    def full_state_dict(self) -> dict | None:
        """ZeRO-3: the full weights gathered onto rank 0's CPU module by module (collective; None on other
        ranks). Stages 1-2 keep whole parameters in the module: None = export the module as it is."""
        if self.zero_stage != 3:
            return None
        return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.method != "full")
