"""Plain torch execution: optional DDP, gradient clipping, the plan's optimizer + LambdaLR(schedule)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from unitrain.train.schedule import Schedule


class TorchBackend:
    """Plain torch: optional DDP, gradient clipping, optimizer + LambdaLR."""

    name = "torch"

    def __init__(self, model, optimizer, schedule: Schedule, max_grad_norm: float):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.max_grad_norm = max_grad_norm
        self.ddp = None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model)

    def forward(self, **batch):
        return (self.ddp or self.model)(**batch)

    def no_sync(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return self.ddp.no_sync() if self.ddp is not None and not last_micro else contextlib.nullcontext()

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def trainable_state(self) -> dict:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.trainable_state().items()}, str(folder / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.model.named_parameters())
        missing = [k for k in params if params[k].requires_grad and k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def unwrap(self):
        return self.model

    def full_state_dict(self) -> None:
        """None: the module itself holds the full weights (ZeRO-3's backend gathers them instead)."""
        return None
