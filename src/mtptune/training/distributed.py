"""Multi-process training under `torchrun`: DDP, per-rank data shards, rank-0 checkpoints.

The head's embed / lm_head / verifier final norm are frozen non-persistent buffers (and the rotary tables are
buffers too): every rank loads them itself, so DDP must never broadcast them (`broadcast_buffers=False`), which
would also move gigabytes of vocabulary matrix per step. The loss is token-weighted across ranks: each rank
divides by the global supervised-token count N_k and multiplies by world_size to undo DDP's gradient averaging,
so W ranks compute the same update as one rank over the same global batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mtptune.devices import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Read torchrun's environment; start the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, "--device", local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_head(head: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return head
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Never sync the frozen shared tensors, neither at init nor per forward (every rank loaded its own copy).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(head, [n for n, _ in head.named_buffers()])
    with warnings.catch_warnings():
        # Newer torch deprecates the flag in favour of forward_sync_buffers, which still syncs at init.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(head, device_ids=device_ids, broadcast_buffers=False)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
