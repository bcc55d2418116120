"""Plan.execution -> the execution backend: plain torch (DDP across ranks), or a DeepSpeed ZeRO engine.

The trainer talks to a backend through a handful of calls — forward, no_sync, backward, step, save, load,
unwrap, full_state_dict — so the loop is the same whatever strategy the plan chose.
"""

from __future__ import annotations

import importlib.util

from unitrain.errors import MissingPackageError
from unitrain.train.backends.optimizer import build_optimizer
from unitrain.train.backends.torch_backend import TorchBackend
from unitrain.train.schedule import Schedule

__all__ = ["build_backend", "build_optimizer", "TorchBackend"]


def build_backend(plan, model, recipe, schedule: Schedule):
    """The backend the plan's execution asks for, with the recipe's optimizer hyperparameters."""
    t, ex = recipe.training, plan.execution
    if ex.uses_deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise MissingPackageError("deepspeed", f"ZeRO stage {ex.zero_stage}", extra="deepspeed")
        from unitrain.train.backends.deepspeed_engine import DeepSpeedBackend

        return DeepSpeedBackend(plan, model, recipe, schedule)
    optimizer = build_optimizer(model, ex.optimizer, t.lr, t.weight_decay, t.betas)
    return TorchBackend(model, optimizer, schedule, t.max_grad_norm)
