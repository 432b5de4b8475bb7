"""Balanced top-k: exact largest-remainder quotas, ranking inside clusters, online centroids."""

import pytest
import torch

from pipeline.selection.balance import (
    ClusterBalance,
    balanced_topk,
    cluster_quotas,
    cluster_stats,
    kmeans_pp,
    nearest,
)


def test_quotas_are_largest_remainder_and_exact():
    cl = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)  # sizes 5, 3, 2 of G = 10
    # k = 4: exact shares 2.0, 1.2, 0.8 -> floors 2, 1, 0 and the one left goes to cluster 2 (.8)
    assert cluster_quotas(cl, 3, 4).tolist() == [2, 1, 1]
    # k = 7: 3.5, 2.1, 1.4 -> 3, 2, 1, the one left to cluster 0 (.5)
    assert cluster_quotas(cl, 4, 7).tolist() == [4, 2, 1, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        G, K = (
            int(torch.randint(5, 60, (1,), generator=gen)),
            int(torch.randint(1, 8, (1,), generator=gen)),
        )
        cl = torch.randint(K, (G,), generator=gen)
        k = int(torch.randint(1, G + 1, (1,), generator=gen))
        q = cluster_quotas(cl, K, k)
        n = torch.bincount(cl, minlength=K)
        exact = k * n.double() / G
        assert int(q.sum()) == k
        assert torch.all(q <= n)
        assert torch.all((q.double() - exact).abs() < 1)  # floor or ceil of the exact share


def test_balanced_topk_takes_each_quota_by_key():
    key = torch.tensor([5.0, 1.0, 4.0, 9.0, 2.0, 8.0, 3.0, 7.0])
    cl = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    tie = torch.arange(8)
    q = torch.tensor([2, 1, 1])
    mask = balanced_topk(key, tie, cl, q, largest=True)
    assert mask.nonzero().flatten().tolist() == [0, 2, 3, 7]
    mask = balanced_topk(key, tie, cl, q, largest=False)
    assert mask.nonzero().flatten().tolist() == [1, 2, 4, 7]
    # ties inside a cluster go to the smaller tie draw
    mask = balanced_topk(torch.zeros(8), torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]), cl, q)
    assert mask.nonzero().flatten().tolist() == [1, 2, 6, 7]


def test_kmeans_pp_and_nearest_find_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(4, dtype=torch.float64)[:3] * 5
    x = torch.cat(
        [c + 0.1 * torch.randn(20, 4, generator=gen, dtype=torch.float64) for c in centres]
    )
    c = kmeans_pp(x, 3, torch.Generator().manual_seed(0))
    lab = nearest(x, c)
    assert all(len(set(lab[i * 20 : (i + 1) * 20].tolist())) == 1 for i in range(3))
    assert len(set(lab.tolist())) == 3
    # fewer distinct rows than K still gives K centres
    assert kmeans_pp(
        torch.ones(5, 2, dtype=torch.float64), 3, torch.Generator().manual_seed(0)
    ).shape == (3, 2)


def test_cluster_balance_is_deterministic_learns_running_means_and_round_trips():
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(32, 6, generator=gen) for _ in range(4)]
    a, b = ClusterBalance(4, seed=7), ClusterBalance(4, seed=7)
    for x in batches[:2]:
        assert torch.equal(a.assign(x), b.assign(x))
    assert torch.equal(a.centroids, b.centroids)
    assert float(a.counts.sum()) == 64  # every row has been averaged into one centroid
    c = ClusterBalance(4, seed=7)
    c.load_state_dict(a.state_dict())
    for x in batches[2:]:
        assert torch.equal(a.assign(x), c.assign(x))
    with pytest.raises(ValueError, match="selection.clusters=5"):
        ClusterBalance(5, seed=7).load_state_dict(a.state_dict())


def test_cluster_stats_report_kept_fraction_per_cluster():
    cl = torch.tensor([0, 0, 0, 0, 2, 2])
    kept = torch.tensor([True, False, True, False, True, True])
    st = cluster_stats(cl, kept, 3)
    assert st["select/cluster_kept_frac/c00"] == 0.5 and st["select/cluster_kept_frac/c02"] == 1.0
    assert "select/cluster_kept_frac/c01" not in st  # empty cluster
    assert st["select/cluster_kept_frac_spread"] == 0.5 and st["select/clusters_used"] == 2
