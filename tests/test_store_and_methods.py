"""Score store (sharded vs replicated reference, save/restore) and the selection scores."""

import pytest
import torch
from distutil import run_ranks

from pipeline.selection.methods import correlation, differential, per_sample_clip_loss
from pipeline.selection.store import ScoreStore, StoreRangeError


def _store_rank(rank, world, size, steps):
    gen = torch.Generator().manual_seed(7)
    store = ScoreStore(size, rank, world)
    ref = torch.zeros(size)
    known = torch.zeros(size, dtype=torch.bool)
    reads = []
    for _ in range(steps):
        uid_G = torch.randperm(size, generator=gen)[:12]
        val_G = torch.rand(12, generator=gen)
        only = torch.rand(12, generator=gen) > 0.3
        store.write(uid_G, val_G, only=only)
        ref[uid_G[only]] = val_G[only]
        known[uid_G[only]] = True
        q = torch.randperm(size, generator=gen)[:10]
        v, k = store.read(q)
        reads.append((v, k, ref[q].clone(), known[q].clone()))
    return reads, store.state_dict()


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_store_equals_replicated(world):
    res = run_ranks(_store_rank, world, args=(37, 6), timeout=100)
    for reads, _sd in res:
        for v, k, ref_v, ref_k in reads:
            assert torch.equal(k, ref_k)
            assert torch.allclose(v[k], ref_v[k])
    # each rank holds only its own uids: slots = ceil(size / world)
    assert all(sd["value"].numel() == (37 + world - 1) // world for _, sd in res)


def test_store_state_roundtrip_and_range():
    s = ScoreStore(10, 0, 1)
    s.write(torch.tensor([1, 4]), torch.tensor([3.0, 5.0]))
    t = ScoreStore(10, 0, 1)
    t.load_state_dict(s.state_dict())
    v, k = t.read(torch.tensor([4, 1, 2]))
    assert v.tolist()[:2] == [5.0, 3.0] and k.tolist() == [True, True, False]
    with pytest.raises(StoreRangeError, match="uid 10 is outside"):
        t.read(torch.tensor([10]))
    with pytest.raises(ValueError, match="world=2"):
        ScoreStore(10, 0, 2).load_state_dict(s.state_dict())


def test_differential_hand_computed():
    s = torch.tensor([10.0, 20.0, 30.0])  # mean 20
    h = torch.tensor([30.0, 20.0, 10.0])  # mean 20
    d = differential(s, h)
    # (h - 20) - (s - 20)
    assert torch.allclose(d, torch.tensor([20.0, 0.0, -20.0]))
    # centring: adding a constant to all of s or h changes nothing
    assert torch.allclose(differential(s + 5, h - 3), d)
    # score_ema is not centred
    assert torch.allclose(differential(s + 5, h, centred=False), h - s - 5)


def test_correlation_is_clamped_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(correlation(a, b), torch.tensor([100.0, 0.0, 100.0]))


def test_per_sample_loss_matches_open_clip_mean():
    from open_clip import ClipLoss

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    per = per_sample_clip_loss(img, txt, scale)
    assert torch.allclose(per.mean(), ClipLoss()(img, txt, scale), atol=1e-6)
    # a matched pair has a smaller loss than a mismatched one
    txt2 = txt.clone()
    txt2[0] = img[0]
    assert per_sample_clip_loss(img, txt2, scale)[0] < per[0]
