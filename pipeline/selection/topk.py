"""Global top-k over the gathered super-batch and the plan that rebalances kept samples.

Shapes: W ranks, B super-batch per rank, b train batch per rank, G = W * B gathered rows in
rank-major order (row g lives on rank g // B at local index g % B).

Every rank runs these on the same gathered vectors and gets the same answer, so no further
agreement is needed. The rebalance plan keeps on each rank as many of its own winners as fit
(up to b) and moves only the surplus to ranks that are short, in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.collectives import all_to_all_rows


def global_topk(
    key_G: torch.Tensor, tie_G: torch.Tensor, k: int, largest: bool = True
) -> torch.Tensor:
    """Bool mask [G] of the k rows with the largest (or smallest) key; ties break by smaller tie_G.

    The selector passes a seeded random permutation as ``tie_G`` (the same on every rank), never
    the uid: uid order follows the url list, so breaking ties by uid would keep one end of it.
    """
    G = key_G.numel()
    assert 0 < k <= G, (k, G)
    key = key_G.detach().double().cpu()
    by_tie = torch.argsort(tie_G.detach().cpu(), stable=True)
    order = torch.argsort(key[by_tie], descending=largest, stable=True)
    chosen = by_tie[order[:k]]
    mask = torch.zeros(G, dtype=torch.bool)
    mask[chosen] = True
    return mask


def tie_draw(G: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of the G rows used to break key ties; seeded, so equal on every rank. [G]"""
    return torch.randperm(G, generator=gen)


@dataclass
class RebalancePlan:
    keep_local: list[torch.Tensor]  # per rank: local indices it keeps for itself
    send_local: list[list[torch.Tensor]]  # [src][dst]: local indices src sends to dst
    moved: int  # samples that cross ranks (= total surplus)

    def counts(self, src: int) -> list[int]:
        return [len(ix) for ix in self.send_local[src]]


def plan_rebalance(kept_G: torch.Tensor, world: int, b: int) -> RebalancePlan:
    """Deterministic plan so every rank ends with exactly b kept samples."""
    G = kept_G.numel()
    B = G // world
    assert B * world == G and int(kept_G.sum()) == world * b
    per_rank = [torch.nonzero(kept_G[r * B : (r + 1) * B]).flatten() for r in range(world)]
    keep_local = [ix[:b] for ix in per_rank]
    surplus = [(r, ix[b:]) for r, ix in enumerate(per_rank) if len(ix) > b]
    need = [(r, b - len(ix)) for r, ix in enumerate(per_rank) if len(ix) < b]
    send = [[torch.empty(0, dtype=torch.long) for _ in range(world)] for _ in range(world)]
    # walk surplus (by source rank) and deficits (by destination rank) in order
    si, s_off = 0, 0
    moved = 0
    for dst, want in need:
        while want > 0:
            src, ix = surplus[si]
            take = min(want, len(ix) - s_off)
            send[src][dst] = torch.cat([send[src][dst], ix[s_off : s_off + take]])
            s_off += take
            want -= take
            moved += take
            if s_off == len(ix):
                si, s_off = si + 1, 0
    return RebalancePlan(keep_local=keep_local, send_local=send, moved=moved)


# those present travel (weight: InfoBatch loss weights)
TENSOR_KEYS = ("images", "tokens", "uid", "label", "noisy", "noise_kind", "weight")


def apply_rebalance(batch: dict, plan: RebalancePlan, rank: int, world: int) -> dict:
    """This rank's train batch: its kept rows, then rows received from other ranks (by source).

    One all_to_all per tensor field; each rank sends only the rows the plan moves.
    Captions (python strings) travel only when the batch has them and world == 1.
    """
    keep = plan.keep_local[rank]
    send_ix = torch.cat([plan.send_local[rank][d] for d in range(world)])
    send_counts = plan.counts(rank)
    recv_counts = [len(plan.send_local[s][rank]) for s in range(world)]
    out = {}
    for k in (k for k in TENSOR_KEYS if k in batch):
        x = batch[k]
        ix_dev = keep.to(x.device)
        if world > 1 and plan.moved > 0:
            received = all_to_all_rows(x[send_ix.to(x.device)], send_counts, recv_counts)
            out[k] = torch.cat([x[ix_dev], received])
        else:
            out[k] = x[ix_dev]
    if "captions" in batch:
        caps = batch["captions"]
        out["captions"] = [caps[i] for i in keep.tolist()] + ([""] * (len(out["uid"]) - len(keep)))
    return out
