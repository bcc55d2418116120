"""The process world a launcher gives (torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK) and tiny collectives.

Single-process runs need no process group: every helper here degrades to the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout_s: float | None = None) -> Context:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA).

    A rank that dies closes its sockets and the others fail at their next collective; a rank that hangs
    ends the others after `timeout_s` (env UNITRAIN_DIST_TIMEOUT, default 300 s).
    """
    timeout_s = timeout_s or float(os.environ.get("UNITRAIN_DIST_TIMEOUT", "300"))
    world = launched_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if world > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            td.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, td.DistError) as e:
            from unitrain.errors import UnitrainError

            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            hint = ("the port is in use: pass another --master_port to the launcher"
                    if "address already in use" in str(e).lower() else
                    "check MASTER_ADDR/MASTER_PORT, the hostfile and that every node can reach the first")
            raise UnitrainError(f"could not join the process group at {where} ({type(e).__name__}: {e}); "
                                f"{hint}") from None
    return context()


def context() -> Context:
    world = td.get_world_size() if td.is_available() and td.is_initialized() else 1
    rank = td.get_rank() if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Context(rank, world, local_rank, device)


def _active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def all_sum(value, device):
    if not _active():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    td.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def mean(value: float, device) -> float:
    return all_sum(value, device) / td.get_world_size() if _active() else value


def any_true(flag: bool, device) -> bool:
    return bool(all_sum(int(flag), device)) if _active() else flag


def barrier() -> None:
    if _active():
        td.barrier()


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died or hung (gloo/NCCL say so in the message)."""
    if not _active():
        return False
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, td.DistError)) and any(
        k in text for k in ("closed by peer", "connection reset", "timed out", "timeout", "nccl", "gloo"))


def shutdown() -> None:
    """Destroy the process group at exit (without it ~1 in 20 two-process gloo runs abort at exit)."""
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
