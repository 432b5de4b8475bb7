"""The contrastive loss over ranks: the averaged gradient on 2 gloo ranks equals the gradient of
the single-process loss on the concatenated batch (fp32, atol 1e-5)."""

import pytest
import torch
from distutil import run_ranks


def _make(seed=0):
    torch.manual_seed(seed)
    enc_i = torch.nn.Linear(6, 4)
    enc_t = torch.nn.Linear(5, 4)
    x = torch.randn(8, 6)
    y = torch.randn(8, 5)
    return enc_i, enc_t, x, y


def _loss(enc_i, enc_t, x, y, rank, world):
    from open_clip import ClipLoss

    fi = torch.nn.functional.normalize(enc_i(x), dim=-1)
    ft = torch.nn.functional.normalize(enc_t(y), dim=-1)
    fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    return fn(fi, ft, torch.tensor(7.0))


def _rank_grad(rank, world):
    import torch.distributed as dist

    enc_i, enc_t, x, y = _make()
    n = x.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss = _loss(enc_i, enc_t, x[sl], y[sl], rank, world)
    loss.backward()
    grads = []
    for p in list(enc_i.parameters()) + list(enc_t.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        grads.append(g / world)  # what data-parallel averaging (DeepSpeed) applies
    return grads


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_rank_gradient_equals_single_process():
    enc_i, enc_t, x, y = _make()
    _loss(enc_i, enc_t, x, y, 0, 1).backward()
    ref = [p.grad for p in list(enc_i.parameters()) + list(enc_t.parameters())]
    got = run_ranks(_rank_grad, 2, timeout=100)
    for rank_grads in got:
        for g, r in zip(rank_grads, ref):
            assert torch.allclose(g, r, atol=1e-5), (g - r).abs().max()
