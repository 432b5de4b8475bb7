"""Small named collectives. Shapes use suffixes: N = per-rank rows, W = world size.

None of these carry gradients: selection works on no-grad scores, and the contrastive loss uses
open_clip's own feature gather (which does). Inputs may live on any device: NCCL needs CUDA
tensors, so they travel through the communication device and come back where they were.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(x_N: torch.Tensor) -> torch.Tensor:
    """[N, ...] on every rank (same N everywhere) -> [W * N, ...], rank-major order. No grad."""
    W = world_size()
    if W == 1:
        return x_N.detach().clone()
    x = x_N.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(x) for _ in range(W)]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(x_N.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks; returns the result on x's device. No grad."""
    if world_size() == 1:
        return x
    y = x.to(_comm_device())
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_max(n: int) -> int:
    """Largest of an int over ranks (e.g. how many forwards every rank must run in lockstep)."""
    if world_size() == 1:
        return int(n)
    t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_to_all_rows(
    send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
) -> torch.Tensor:
    """Rows [sum(send_counts), ...] split by destination rank -> rows received [sum(recv_counts), ...].

    ``send`` is ordered by destination rank (send_counts[j] rows for rank j); the result is
    ordered by source rank. Counts must agree pairwise across ranks (the caller's plan).
    """
    if world_size() == 1:
        return send.clone()
    if send.dtype == torch.bool:  # gloo has no bool all_to_all
        return all_to_all_rows(send.to(torch.uint8), send_counts, recv_counts).bool()
    x = send.to(_comm_device()).contiguous()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv_counts, send_counts)
    return out.to(send.device)
