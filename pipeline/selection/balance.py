"""Balanced top-k: each cluster of captions keeps its share of the kept set.

Shapes: G gathered rows, D text-feature dim, K clusters, k = W * b rows kept.

Score filters narrow the concept mix (some concepts are learned first and all their pairs
score high). Balancing keeps every concept's share: each sample's cluster is the nearest of K
centroids of its text features (captions are what a web pair always has), the centroids are
learned online from the gathered features (k-means++ on the first super-batch that needs them,
then running means), and each cluster keeps a largest-remainder quota of the k, ranked inside
by the method's key. Every rank sees the same gathered features and runs the same CPU float64
arithmetic with the same seeded generator, so all ranks agree on centroids, clusters and
quotas with no extra communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans_pp(x_GD: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """K initial centres drawn from the rows by k-means++ (D^2 sampling). [K, D]"""
    G = x_GD.shape[0]
    assert K <= G, (K, G)
    idx = [int(torch.randint(G, (1,), generator=gen))]
    d2_G = ((x_GD - x_GD[idx[0]]) ** 2).sum(1)
    for _ in range(1, K):
        if float(d2_G.sum()) <= 0:  # fewer distinct rows than K: any row not yet chosen
            free = torch.ones(G, dtype=torch.bool)
            free[idx] = False
            nxt = int(torch.nonzero(free).flatten()[0])
        else:
            nxt = int(torch.multinomial(d2_G, 1, generator=gen))
        idx.append(nxt)
        d2_G = torch.minimum(d2_G, ((x_GD - x_GD[nxt]) ** 2).sum(1))
    return x_GD[idx].clone()


def nearest(x_GD: torch.Tensor, c_KD: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of each row (squared L2; ties: lower index). [G]"""
    d_GK = (x_GD * x_GD).sum(1, keepdim=True) - 2 * x_GD @ c_KD.T + (c_KD * c_KD).sum(1)
    return torch.argmin(d_GK, dim=1)


def cluster_quotas(cluster_G: torch.Tensor, K: int, k: int) -> torch.Tensor:
    """Largest-remainder shares of k over the clusters, proportional to their sizes. [K] int64

    Exact integer arithmetic: quota_c = floor(k n_c / G) plus one for the (k - sum) clusters with
    the largest remainders (ties: lower cluster index). Never more than n_c, since k <= G.
    """
    n_K = torch.bincount(cluster_G.cpu(), minlength=K).long()
    G = int(n_K.sum())
    q_K, rem_K = (k * n_K) // G, (k * n_K) % G
    short = k - int(q_K.sum())
    order = torch.argsort(-rem_K, stable=True)
    q_K[order[:short]] += 1
    return q_K


def balanced_topk(
    key_G: torch.Tensor,
    tie_G: torch.Tensor,
    cluster_G: torch.Tensor,
    quota_K: torch.Tensor,
    largest: bool = True,
) -> torch.Tensor:
    """Bool mask [G]: in each cluster c, the quota_K[c] rows with the best key (ties by tie_G)."""
    G, K = key_G.numel(), quota_K.numel()
    key, cl = key_G.detach().double().cpu(), cluster_G.cpu()
    order = torch.argsort(tie_G.cpu(), stable=True)
    order = order[torch.argsort(key[order], descending=largest, stable=True)]
    order = order[torch.argsort(cl[order], stable=True)]  # by cluster, best key first inside
    n_K = torch.bincount(cl, minlength=K)
    start_K = torch.cumsum(n_K, 0) - n_K
    pos = torch.arange(G) - start_K[cl[order]]  # rank of each row inside its cluster
    mask = torch.zeros(G, dtype=torch.bool)
    mask[order[pos < quota_K[cl[order]]]] = True
    return mask


class ClusterBalance:
    """K online centroids of text features; ``assign`` labels rows and then learns from them."""

    def __init__(self, K: int, seed: int):
        self.K = K
        self.seed = seed
        self.centroids: torch.Tensor | None = None  # [K, D] float64, None until the first assign
        self.counts = torch.zeros(K, dtype=torch.float64)  # rows each centroid has averaged

    def assign(self, txt_GD: torch.Tensor) -> torch.Tensor:
        """Cluster of each row [G] under the current centroids, then a running-mean update.

        Running means (each centroid the mean of every row ever assigned to it: per-centre step
        1 / count, Sculley's mini-batch k-means) move less as they settle, so cluster identities
        stay stable over training, which the per-cluster shares need.
        """
        x = F.normalize(txt_GD.detach().double().cpu(), dim=1)
        if self.centroids is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
            self.centroids = kmeans_pp(x, self.K, gen)
        cl = nearest(x, self.centroids)
        n_K = torch.bincount(cl, minlength=self.K).double()
        sum_KD = torch.zeros_like(self.centroids).index_add_(0, cl, x)
        new = self.counts + n_K
        upd = n_K > 0
        self.centroids[upd] += (sum_KD[upd] - n_K[upd, None] * self.centroids[upd]) / new[upd, None]
        self.counts = new
        return cl

    def state_dict(self) -> dict:
        return {
            "K": self.K,
            "seed": self.seed,
            "centroids": self.centroids,
            "counts": self.counts.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["K"] != self.K:
            raise ValueError(
                f"balance checkpoint has {sd['K']} clusters, this run selection.clusters={self.K}"
            )
        self.centroids = None if sd["centroids"] is None else sd["centroids"].clone()
        self.counts = sd["counts"].clone()


def cluster_stats(cluster_G: torch.Tensor, kept_G: torch.Tensor, K: int) -> dict:
    """select/cluster_kept_frac/cNN per non-empty cluster, and their spread (max - min)."""
    n_K = torch.bincount(cluster_G, minlength=K).double()
    kept_K = torch.bincount(cluster_G[kept_G], minlength=K).double()
    out = {}
    fracs = []
    for c in torch.nonzero(n_K).flatten().tolist():
        f = float(kept_K[c] / n_K[c])
        out[f"select/cluster_kept_frac/c{c:02d}"] = f
        fracs.append(f)
    out["select/cluster_kept_frac_spread"] = max(fracs) - min(fracs)
    out["select/clusters_used"] = float(len(fracs))
    return out
