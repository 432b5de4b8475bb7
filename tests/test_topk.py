"""Global top-k over ranks and the rebalance plan (pure, then on 2-4 gloo ranks)."""

import pytest
import torch
from distutil import run_ranks

from pipeline.selection.topk import apply_rebalance, global_topk, plan_rebalance


def test_topk_breaks_ties_by_the_tie_vector():
    key = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0])
    tie = torch.tensor([4, 1, 3, 0, 2])
    mask = global_topk(key, tie, 2)
    assert mask.nonzero().flatten().tolist() == [1, 4]  # the 2.0s with the smallest tie draws
    mask = global_topk(key, tie, 2, largest=False)
    assert mask.nonzero().flatten().tolist() == [0, 3]


@pytest.mark.parametrize("world,B,b", [(2, 8, 2), (3, 6, 3), (4, 10, 2)])
def test_plan_balances_every_distribution(world, B, b):
    gen = torch.Generator().manual_seed(0)
    cases = []
    G = world * B
    # all winners on one rank (when they fit), alternating, random
    for r in range(world):
        m = torch.zeros(G, dtype=torch.bool)
        lo = r * B
        n = min(world * b, B)
        m[lo : lo + n] = True
        rest = world * b - n
        others = [i for i in range(G) if not m[i]][:rest]
        m[others] = True
        cases.append(m)
    for _ in range(5):
        m = torch.zeros(G, dtype=torch.bool)
        m[torch.randperm(G, generator=gen)[: world * b]] = True
        cases.append(m)
    for kept in cases:
        plan = plan_rebalance(kept, world, b)
        counts = [kept[r * B : (r + 1) * B].sum().item() for r in range(world)]
        surplus = sum(max(0, c - b) for c in counts)
        assert plan.moved == surplus
        received = [sum(len(plan.send_local[s][d]) for s in range(world)) for d in range(world)]
        sent = [sum(plan.counts(s)) for s in range(world)]
        for r in range(world):
            assert len(plan.keep_local[r]) + received[r] == b
            assert sent[r] == max(0, counts[r] - b)
        # every kept row lands exactly once
        rows = []
        for r in range(world):
            rows += [r * B + int(i) for i in plan.keep_local[r]]
            for d in range(world):
                rows += [r * B + int(i) for i in plan.send_local[r][d]]
        assert sorted(rows) == torch.nonzero(kept).flatten().tolist()


def _rank_topk(rank, world, B, b, mode):
    from pipeline.collectives import all_gather_cat

    gen = torch.Generator().manual_seed(123)
    key_all = torch.rand(world * B, generator=gen)
    if mode == "one_rank":  # every winner on the last rank
        key_all[(world - 1) * B :] += 10.0
    uid_all = torch.randperm(world * B, generator=gen) + 1000
    lo = rank * B
    batch = {
        "images": torch.arange(lo, lo + B).float().view(B, 1, 1, 1).expand(B, 3, 2, 2).clone(),
        "tokens": torch.arange(lo, lo + B).view(B, 1).repeat(1, 4),
        "uid": uid_all[lo : lo + B].clone(),
        "label": torch.arange(lo, lo + B) % 7,
        "noisy": (torch.arange(lo, lo + B) % 3) == 0,
    }
    key_G = all_gather_cat(key_all[lo : lo + B])
    uid_G = all_gather_cat(batch["uid"])
    kept = global_topk(key_G, uid_G, world * b)
    plan = plan_rebalance(kept, world, b)
    out = apply_rebalance(batch, plan, rank, world)
    return {
        "uid": out["uid"].tolist(),
        "row": out["images"][:, 0, 0, 0].long().tolist(),
        "tok": out["tokens"][:, 0].tolist(),
        "noisy": out["noisy"].tolist(),
        "moved": plan.moved,
        "ref": uid_all[global_topk(key_all, uid_all, world * b)].tolist(),
    }


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,mode", [(2, "random"), (2, "one_rank"), (4, "one_rank")])
def test_global_topk_matches_single_process(world, mode):
    B, b = 8, 2
    res = run_ranks(_rank_topk, world, args=(B, b, mode), timeout=150)
    ref = sorted(res[0]["ref"])  # single-process top-k of the concatenated super-batch
    got = sorted(u for r in res for u in r["uid"])
    assert got == ref
    for r in res:
        assert len(r["uid"]) == b  # every rank trains exactly b
        # the rows travelled together: image, tokens and noisy flag belong to the same sample
        assert r["row"] == r["tok"]
        assert r["noisy"] == [x % 3 == 0 for x in r["row"]]
    if mode == "one_rank":
        assert res[0]["moved"] == (world - 1) * b  # only the surplus moved
