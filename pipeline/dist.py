"""Distributed setup: the one module that reads the launcher's environment variables.

torchrun, the `deepspeed` launcher and SLURM (through torchrun) all export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A plain `python -m pipeline.train` has none of them and
runs as a world of one (we still create a process group so every code path is the same).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join (or create) the default process group; gloo on CPU, nccl on GPUs.

    ``timeout_s`` bounds every collective: when a rank dies the others fail with an error
    after at most this long instead of hanging (see launch/env.sh).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    _default_timeout_for_new_groups(timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _default_timeout_for_new_groups(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on.

    DeepSpeed builds its own groups (ZeRO's data-parallel group among them) with
    ``dist.new_group(ranks)`` and no timeout, which takes torch's module default (30 min for
    gloo, 10 min for NCCL), not the world group's: a hung rank would hold its peers in a ZeRO
    all-gather that long. ``new_group`` reads these two globals (``_get_default_timeout``).
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def current() -> DistInfo:
    """DistInfo of an already initialised group (for helpers and tests)."""
    if not dist.is_initialized():
        return DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` of other ranks is ignored."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
