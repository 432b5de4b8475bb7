"""Rules that keep the hard clean pairs, decided without a threshold measured on one dataset.

Shapes: G gathered rows, D feature dim, F mixture features (1 or 2), K mixture components.
Everything runs on the gathered super-batch in float64 (the [G, G] similarities on the features'
device, the per-row values and mixtures on the CPU), so every rank computes the same numbers with
no communication beyond the stores' all-reduces.

The parts (each with its source; docs/selection.md has the reasons):
- ``same_caption``: rows whose text features are (nearly) identical are not negatives of each
  other (false-negative-aware loss; on class-caption data most rows share a caption).
- ``structure_consistency`` (GSC, CVPR 2024): does a pair's image have the same neighbours among
  the images as its caption among the captions? A swapped pair's two neighbourhoods disagree;
  a hard clean pair's agree even while its cross-modal similarity is low. Needs no history.
- ``swap_rank`` as evidence (``swap_null``): how far a pair's own caption ranks among the
  super-batch's other captions for its image (and its image among the other images): a
  rank form of the cross-modal agreement, free of the loss's scale and temperature.
  ``VisitMean`` of it (``swap_mean``): its running mean over the sample's visits, in a
  per-sample store; a swapped caption that cannot be learnt stays near 1/2 over visits while
  one visit's draw may fall low, so the mean ranks it with less noise (DISSect's and AUM's
  point, that a pair's history says more than one step), with no new constant.
- ``MarginTrend`` (AUM, NeurIPS 2020; Confidence Tracking, AAAI 2025): per-sample running
  level and trend of the unclamped margin; a pair whose margin rises is kept while it is low.
- ``fit_gmm`` + ``bic_gain`` + ``BicGate``: whether there is noise to filter is a BIC choice
  between one and two Gaussian components: invariant to the features' scale and shift.
- ``swap_rank`` + ``SwapNullShare`` (the ``*_null`` rules): how much noise there is, from the
  one thing known about a swapped caption on any data: it is exchangeable with the super-batch's
  other captions, so its rank among them is uniform. Storey's estimator (2002) of the share of
  such rows, pooled over steps; about 0 on clean data, where the BIC test still finds two modes.
- ``soft_tiers``: the kept set is drawn by Gumbel top-k in proportion to P(clean)^gamma, and no
  more rows are dropped as noisy than the mixture's own estimate of the noise share.
  ``rank_tiers`` (``draw='rank'``): the rows of most evidence are dropped, by rank, with no
  mixture: the estimated share says how many, the evidence which.
- ``grenander`` + ``null_posterior`` (``swap_lfdr``, ``draw='lfdr'``): Efron's local false
  discovery rate of ``swap_rank``, from its known null density (uniform) and the ranks' own
  non-increasing density (Grenander, no bandwidth); ``posterior_tiers`` drops each row with that
  probability: as the rank does where the model has learnt the clean pairs, spread where it has
  not (``swap_null``'s failure: ranking by a weak model's evidence keeps exactly the easiest
  pairs); and it drops nothing while the null's share leaves fewer rows than the step keeps
  (the guard; ``swap_guard`` is ``swap_null``'s drop by rank with it).
- InfoBatch (ICLR 2024): among the likely-clean rows, only those below the mean loss (already
  learned) are pruned, at random, and the kept ones of that group are up-weighted so that the
  expected gradient is unchanged (``MixtureRule.weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.selection.store import ScoreStore

# --- false negatives -------------------------------------------------------------------------------


def same_caption(txt_GD: torch.Tensor, min_cos: float) -> torch.Tensor:
    """Bool [G, G]: pairs of distinct rows whose captions' text features have cosine >= min_cos
    (identical captions give identical features). The diagonal is False."""
    t = torch.nn.functional.normalize(txt_GD.double(), dim=-1)
    same = t @ t.T >= min_cos - 1e-9
    same.fill_diagonal_(False)
    return same


def fn_aware_loss(
    img_GD: torch.Tensor, txt_GD: torch.Tensor, logit_scale: torch.Tensor, same_GG: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of each pair against the gathered super-batch, where rows with the same
    caption are not negatives of each other (their logits are masked out). [G] float64"""
    logits = float(logit_scale) * img_GD.double() @ txt_GD.double().T
    logits = logits.masked_fill(same_GG, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    li = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    lt = torch.nn.functional.cross_entropy(logits.T, target, reduction="none")
    return 0.5 * (li + lt)


def margin(img_GD: torch.Tensor, txt_GD: torch.Tensor, same_GG: torch.Tensor) -> torch.Tensor:
    """Unclamped margin of each pair: cos(own caption) - max cos(another caption), where a caption
    identical to its own does not count as another. [G] float64 (a row alone: the own cosine)"""
    cos = torch.nn.functional.normalize(img_GD.double(), dim=-1) @ (
        torch.nn.functional.normalize(txt_GD.double(), dim=-1).T
    )
    own = cos.diagonal().clone()
    eye = torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
    other = cos.masked_fill(same_GG | eye, float("-inf"))
    best = other.max(dim=1).values
    return own - torch.where(torch.isfinite(best), best, torch.zeros_like(best))


# --- structure consistency -------------------------------------------------------------------------


def structure_consistency(
    img_GD: torch.Tensor, txt_GD: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cosine between each pair's image-to-images and caption-to-captions similarity rows
    (softmax at ``temperature``, self excluded): high when both have the same neighbours. [G]"""
    i = torch.nn.functional.normalize(img_GD.double(), dim=-1)
    t = torch.nn.functional.normalize(txt_GD.double(), dim=-1)
    eye = torch.eye(i.shape[0], dtype=torch.bool, device=i.device)
    a = torch.softmax((i @ i.T / temperature).masked_fill(eye, float("-inf")), dim=1)
    b = torch.softmax((t @ t.T / temperature).masked_fill(eye, float("-inf")), dim=1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


# --- mixtures and the BIC decision ---------------------------------------------------------------


def standardise(x_G: torch.Tensor, group_G: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std over the super-batch, or within each group; 0 where the spread is 0. [G]"""
    x = x_G.detach().double().cpu()
    if group_G is None:
        group_G = torch.zeros_like(x, dtype=torch.long)
    group_G = group_G.cpu()
    n = torch.bincount(group_G).double()
    mean = torch.bincount(group_G, weights=x) / n.clamp_min(1)
    var = torch.bincount(group_G, weights=x * x) / n.clamp_min(1) - mean**2
    std = var.clamp_min(0).sqrt()[group_G]
    z = (x - mean[group_G]) / std.clamp_min(1e-12)
    return torch.where(std > 1e-9, z, torch.zeros_like(z))


def standardise_min(x_G: torch.Tensor, group_G: torch.Tensor | None, min_rows: int) -> torch.Tensor:
    """Standardised within each group of at least ``min_rows`` rows; a smaller group's rows are
    standardised with the whole super-batch's statistics (a mean and spread of 3 rows say
    little). [G] float64"""
    z_all = standardise(x_G)
    if group_G is None:
        return z_all
    group_G = group_G.cpu()
    big = torch.bincount(group_G)[group_G] >= min_rows
    return torch.where(big, standardise(x_G, group_G), z_all)


def box_cox(x_G: torch.Tensor) -> torch.Tensor:
    """Box-Cox transform of positive values with the power (on a grid in [-1, 2]) that makes
    them most Gaussian by profile likelihood: a skewed unimodal loss becomes one Gaussian, so a
    BIC test then finds a second component only where there is a second mode. Invariant to the
    values' scale. [G] float64"""
    x = x_G.double().clamp_min(1e-12)
    logx = x.log()
    best, best_ll = logx, -math.inf
    for lam in torch.linspace(-1, 2, 13, dtype=torch.float64).tolist():
        y = logx if abs(lam) < 1e-9 else (x.pow(lam) - 1) / lam
        ll = -0.5 * x.numel() * float(y.var(unbiased=False).clamp_min(1e-300).log()) + (
            lam - 1
        ) * float(logx.sum())
        if ll > best_ll:
            best, best_ll = y, ll
    return best


@dataclass
class GaussianMixture:
    resp_GK: torch.Tensor  # posterior of each component per row
    weight_K: torch.Tensor
    mean_KF: torch.Tensor
    loglik: float  # total log-likelihood of the rows
    n_params: int


def _log_normal(x_GF: torch.Tensor, mean_F: torch.Tensor, cov_FF: torch.Tensor) -> torch.Tensor:
    """Log density of N(mean, cov) at each row, F = 1 or 2 in closed form (no LAPACK call: the
    first one costs seconds on a busy CPU). [G]"""
    d = x_GF - mean_F
    if d.shape[1] == 1:
        var = cov_FF[0, 0]
        return -0.5 * (d[:, 0] ** 2 / var + var.log() + math.log(2 * math.pi))
    assert d.shape[1] == 2, d.shape
    a, b, c = cov_FF[0, 0], cov_FF[0, 1], cov_FF[1, 1]
    det = a * c - b * b
    maha = (c * d[:, 0] ** 2 - 2 * b * d[:, 0] * d[:, 1] + a * d[:, 1] ** 2) / det
    return -0.5 * (maha + det.log() + 2 * math.log(2 * math.pi))


def fit_gmm(x_GF: torch.Tensor, K: int, iters: int = 30) -> GaussianMixture:
    """K-component full-covariance Gaussian mixture by EM (F = 1 or 2 features), deterministic:
    K = 2 starts from the
    split at the median of the features' sum (the axis along which every feature says 'noisy').
    Covariances get a ridge of 1e-6 of the data's variance, so the fit is scale-free."""
    x = x_GF.double()
    G, F_ = x.shape
    ridge = 1e-6 * float(x.var(dim=0).mean().clamp_min(1e-30)) * torch.eye(F_, dtype=x.dtype)
    if K == 1:
        resp = torch.ones(G, 1, dtype=x.dtype)
    else:
        assert K == 2, K
        s = x.sum(1)
        hi = (s > s.median()).double()
        resp = torch.stack([1 - hi, hi], dim=1)
    for _ in range(iters if K > 1 else 1):
        nk = resp.sum(0).clamp_min(1e-9)
        weight = nk / G
        # elementwise sums, no BLAS call: [G, F] is tiny, and a threaded GEMM on a busy CPU
        # costs 30x more than the arithmetic
        mean = (resp[:, :, None] * x[:, None, :]).sum(0) / nk[:, None]
        covs = []
        for k in range(K):
            d = x - mean[k]
            outer = resp[:, k, None, None] * d[:, :, None] * d[:, None, :]
            covs.append(outer.sum(0) / nk[k] + ridge)
        logp = torch.stack(
            [_log_normal(x, mean[k], covs[k]) + weight[k].log() for k in range(K)], dim=1
        )
        top = torch.maximum(logp[:, 0], logp[:, -1])[:, None]  # (torch.softmax on [G, 2]
        e = (logp - top).exp()  # spins its thread pool on a busy CPU: 30x slower)
        resp = e / e.sum(1, keepdim=True)
    loglik = float((top[:, 0] + e.sum(1).log()).sum())
    n_params = K * (F_ + F_ * (F_ + 1) // 2) + (K - 1)
    return GaussianMixture(resp, weight, mean, loglik, n_params)


def bic_gain(one: GaussianMixture, two: GaussianMixture, G: int) -> float:
    """BIC(1 component) - BIC(2 components), per row: > 0 when the data favour two components.
    Log-likelihood differences do not change when a feature is scaled or shifted."""
    return (2 * (two.loglik - one.loglik) - (two.n_params - one.n_params) * math.log(G)) / G


class RunningGate:
    """A yes/no decision on a per-step value's running mean ``d <- m d + (1-m) x`` (started at the
    first value): open while it exceeds ``threshold``. State: the running mean (key "d")."""

    def __init__(self, threshold: float, momentum: float, stat: str):
        self.threshold, self.momentum, self.stat = threshold, momentum, stat
        self.d: float | None = None

    def observe(self, x: float) -> bool:
        self.d = x if self.d is None else self.momentum * self.d + (1 - self.momentum) * x
        return self.is_open

    @property
    def is_open(self) -> bool:
        return self.d is not None and self.d > self.threshold

    def stats(self) -> dict[str, float]:
        if self.d is None:
            return {}
        return {self.stat: self.d, "select/filtering": float(self.is_open)}

    def state_dict(self) -> dict:
        return {"d": self.d}

    def load_state_dict(self, sd: dict) -> None:
        self.d = sd["d"]


class BicGate(RunningGate):
    """Whether there is noise to filter: the running mean of the per-row BIC gain of two
    components over one, open while it is positive. Nothing in it depends on the dataset's scale
    or on the rows per cluster, unlike a separation threshold."""

    def __init__(self, momentum: float):
        super().__init__(0.0, momentum, "select/bic_gain")


def monotone(p_noisy_G: torch.Tensor, evidence_G: torch.Tensor) -> torch.Tensor:
    """P(noisy) made non-decreasing in the evidence (running max in evidence order): a broad
    component also owns the far clean tail, and a row with less evidence of noise must never
    count as more likely noisy. [G]"""
    order = torch.argsort(evidence_G, stable=True)
    out = torch.empty_like(p_noisy_G)
    out[order] = torch.cummax(p_noisy_G[order], dim=0).values
    return out


def mixture_noisy(fit: GaussianMixture, ev_GF: torch.Tensor) -> torch.Tensor:
    """P(noisy) [G] of each row under a two-component fit of its evidence: the responsibility
    of the component of most evidence, made monotone in the evidence (``monotone``)."""
    return monotone(fit.resp_GK[:, int(torch.argmax(fit.mean_KF.sum(1)))], ev_GF.sum(1))


def gumbel_keys(logp_G: torch.Tensor, gamma: float, u_G: torch.Tensor) -> torch.Tensor:
    """gamma * log p + Gumbel noise: the top-k of these keys is a draw without replacement in
    proportion to p^gamma (the Gumbel-top-k trick). u_G: uniforms in (0, 1). [G] float64"""
    u = u_G.double().clamp(1e-12, 1 - 1e-12)
    return gamma * logp_G.double() - torch.log(-torch.log(u))


def soft_tiers(
    clean_G: torch.Tensor, noise_share: float, gamma: float, u_G: torch.Tensor
) -> torch.Tensor:
    """Bool [G]: the rows dropped as noisy: the round(noise_share * G) lowest Gumbel keys of
    log P(clean), never more than the mixture's own estimate of the noise share."""
    G = clean_G.shape[0]
    n_noisy = int(round(noise_share * G))
    keys = gumbel_keys(clean_G.clamp_min(1e-300).log(), gamma, u_G)
    noisy = torch.zeros(G, dtype=torch.bool)
    noisy[torch.argsort(keys)[:n_noisy]] = True
    return noisy


def rank_tiers(evidence_G: torch.Tensor, noise_share: float) -> torch.Tensor:
    """Bool [G]: the round(noise_share * G) rows of most noise evidence (ties: lower row first)."""
    G = evidence_G.shape[0]
    noisy = torch.zeros(G, dtype=torch.bool)
    noisy[torch.argsort(-evidence_G, stable=True)[: int(round(noise_share * G))]] = True
    return noisy


def posterior_tiers(
    p_noisy_G: torch.Tensor, noise_share: float, evidence_G: torch.Tensor, u_G: torch.Tensor
) -> torch.Tensor:
    """Bool [G]: each row dropped as noisy with its own probability P(noisy) (u < P), no more
    than round(noise_share * G) of them (beyond it, the drawn rows of least evidence stay).
    A calibrated posterior makes the expected count its sum, about the share, and drops a row
    the evidence leaves in doubt as often as it is noisy, not always or never."""
    n_max = int(round(noise_share * p_noisy_G.shape[0]))
    drawn = u_G.double() < p_noisy_G.double()
    if int(drawn.sum()) > n_max:
        order = torch.argsort(-torch.where(drawn, evidence_G.double(), -math.inf), stable=True)
        drawn = torch.zeros_like(drawn)
        drawn[order[:n_max]] = True
    return drawn


# --- the noise share from the swap null ------------------------------------------------------------


def swap_rank(img_GD: torch.Tensor, txt_GD: torch.Tensor, same_GG: torch.Tensor) -> torch.Tensor:
    """Per pair, the share of the super-batch's other captions that match its image at least as
    well as its own caption (ties count half), averaged with the same share of the other images
    for its caption; rows with an identical caption are not 'other'. A well-learnt clean pair:
    near 0. A swapped caption is one more caption of another image, exchangeable with the others:
    its share is uniform on [0, 1], whatever the data, the model or the training stage. [G]"""
    cos = torch.nn.functional.normalize(img_GD.double(), dim=-1) @ (
        torch.nn.functional.normalize(txt_GD.double(), dim=-1).T
    )
    own = cos.diagonal()
    other = ~(same_GG | torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device))
    n = other.sum(1).double()

    def share(beats: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
        hits = ((beats & other).sum(1) + 0.5 * (ties & other).sum(1)).double()
        return torch.where(n > 0, hits / n.clamp_min(1), torch.zeros_like(n))

    i2t = share(cos > own[:, None], cos == own[:, None])
    t2i = share(cos.T > own[:, None], cos.T == own[:, None])  # same_GG is symmetric
    return (0.5 * (i2t + t2i)).cpu()


class SwapNullShare:
    """The noise share as the running share of rows whose ``swap_rank`` exceeds 1/2, times 2
    (Storey's estimator at lambda = 1/2: a swapped row exceeds it half of the time, a learnt clean
    row almost never), pooled over steps by ``f <- m f + (1-m) x`` so that a step's decision
    rests on many super-batches' rows, not on one. At lambda = 1/2 the mean of the two
    directions' shares keeps the null's P(> 1/2) = 1/2. An upper bound while the model has not
    learnt the clean pairs (their shares are spread too); caption text about nothing in the set
    ranks below every other caption and counts up to twice. State: the running share ("f")."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.f: float | None = None

    def observe(self, rank_G: torch.Tensor) -> float:
        x = float((rank_G > 0.5).double().mean())
        self.f = x if self.f is None else self.momentum * self.f + (1 - self.momentum) * x
        return self.share

    @property
    def share(self) -> float:
        return 0.0 if self.f is None else min(1.0, 2.0 * self.f)

    def stats(self) -> dict[str, float]:
        if self.f is None:
            return {}
        return {"select/noise_share": self.share}

    def state_dict(self) -> dict:
        return {"f": self.f}

    def load_state_dict(self, sd: dict) -> None:
        self.f = sd["f"]


def grenander(x_G: torch.Tensor) -> torch.Tensor:
    """The Grenander estimate (1956) of a non-increasing density on [0, 1] at each x: the slope
    of the least concave majorant of the empirical CDF (with (0, 0) and (1, 1) on it) over the
    segment that holds x. Non-parametric and free of any bandwidth or bin: the maximum-likelihood
    density among the non-increasing ones. A mass at x = 0 has infinite density. [G] float64"""
    x_G = x_G.double().clamp(0.0, 1.0)
    xs, counts = torch.unique(x_G, return_counts=True)
    cdf = torch.cumsum(counts.double(), 0) / x_G.shape[0]
    px, py = [0.0] + xs.tolist(), [0.0] + cdf.tolist()
    if px[-1] < 1.0:
        px.append(1.0)
        py.append(1.0)
    hull = [0]  # upper hull, left to right: drop a point on or below its neighbours' chord
    for i in range(1, len(px)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (py[b] - py[a]) * (px[i] - px[a]) <= (py[i] - py[a]) * (px[b] - px[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    vx = torch.tensor([px[i] for i in hull], dtype=torch.float64)
    vy = torch.tensor([py[i] for i in hull], dtype=torch.float64)
    dx, dy = vx[1:] - vx[:-1], vy[1:] - vy[:-1]
    slope = torch.where(dx > 0, dy / dx.clamp_min(1e-300), torch.full_like(dx, math.inf))
    # x in (vx[j], vx[j+1]] lies on segment j; x = 0 on the first one (a mass at 0 is vertical)
    seg = (torch.searchsorted(vx, x_G, right=False) - 1).clamp(0)
    return slope[seg.clamp_max(len(slope) - 1)]


def null_posterior(rank_G: torch.Tensor, pi0: float) -> torch.Tensor:
    """P(a row's ``swap_rank`` comes from the swap null | its value): Efron's local false
    discovery rate min(1, pi0 f0(x) / f(x)), with the null density f0 = 1 (a swapped caption's
    rank is uniform), f the ranks' Grenander density (non-increasing: learnt clean pairs rank
    low) and pi0 the null's share (``SwapNullShare``: pooled over steps; the Grenander density's
    own floor is too noisy at a few hundred rows). Where the model has learnt the clean pairs, f
    is a spike near 0 over a flat floor at pi0: the posterior is near 0 on the spike and 1 on the
    floor, and a draw from it drops what the rank drops. Where it has not, f is broad and the
    posterior varies less: the draw spreads over the lower ranks instead of keeping exactly the
    easiest pairs. [G] float64 in [0, 1]"""
    return (pi0 / grenander(rank_G)).nan_to_num(0.0).clamp(0.0, 1.0)


# --- the per-sample history: visit means, margin trajectory -------------------------------------------


class VisitMean:
    """Per-sample running mean over visits, ``v <- m v + (1 - m) x`` (``v = x`` at first sight),
    in a ScoreStore sharded like the memory history (one all-reduce of G floats per step)."""

    def __init__(self, store_size: int, rank: int, world: int, momentum: float):
        self.store = ScoreStore(store_size, rank, world)
        self.momentum = momentum

    def __call__(self, uid_G: torch.Tensor, x_G: torch.Tensor) -> torch.Tensor:
        old_G, known_G = self.store.read(uid_G)
        m = self.momentum
        new_G = torch.where(known_G, m * old_G.double() + (1 - m) * x_G.double(), x_G.double())
        self.store.write(uid_G, new_G)
        return new_G

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.store.load_state_dict(sd)


class MarginTrend:
    """Per-sample running level ``L <- m L + (1-m) x`` and trend ``T <- m T + (1-m)(x - L_old)``
    of the margin x (at first sight L = x, T = 0), in two ScoreStores sharded like the memory
    history (two all-reduces of G floats per step)."""

    def __init__(self, store_size: int, rank: int, world: int, momentum: float):
        self.level = ScoreStore(store_size, rank, world)
        self.trend = ScoreStore(store_size, rank, world)
        self.momentum = momentum

    def __call__(self, uid_G: torch.Tensor, x_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, known = self.level.read(uid_G)
        T, _ = self.trend.read(uid_G)
        m, x = self.momentum, x_G.double()
        L, T = L.double(), T.double()
        new_T = torch.where(known, m * T + (1 - m) * (x - L), torch.zeros_like(x))
        new_L = torch.where(known, m * L + (1 - m) * x, x)
        self.level.write(uid_G, new_L)
        self.trend.write(uid_G, new_T)
        return new_L, new_T

    def state_dict(self) -> dict:
        return {"level": self.level.state_dict(), "trend": self.trend.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.level.load_state_dict(sd["level"])
        self.trend.load_state_dict(sd["trend"])


def margin_evidence(level_G: torch.Tensor, trend_G: torch.Tensor) -> torch.Tensor:
    """Noise evidence of the margin trajectory, high = noisy: -(z(level) + z(trend)), so a pair
    whose margin rises counts as clean while its level is still low. [G] float64"""
    return -(standardise_min(level_G, None, 2) + standardise_min(trend_G, None, 2))


# --- the rules ---------------------------------------------------------------------------------------


def infobatch_weights(learned_G: torch.Tensor, kept_G: torch.Tensor) -> torch.Tensor:
    """Loss weights [G]: a kept row of the pruned ('learned') group weighs n_group / n_kept of it,
    so the weighted sum over the kept rows equals, in expectation over the random pruning, the
    sum over the whole group (InfoBatch's rescaling); every other row weighs 1."""
    n = float(learned_G.sum())
    n_kept = float((learned_G & kept_G).sum())
    w = torch.ones(learned_G.shape[0], dtype=torch.float32)
    if n_kept > 0:
        w[learned_G & kept_G] = n / n_kept
    return w


@dataclass
class RuleOptions:
    gamma: float
    min_cluster_rows: int
    same_caption_cos: float
    gsc_temperature: float
    margin_momentum: float
    gate_momentum: float
    visit_momentum: float  # swap_mean: the per-sample running mean of swap_rank
    keep_ratio: float  # the share of each super-batch a step keeps (selection.ratio)


class MixtureRule:
    """Noise evidence (1-2 features, high = noisy) -> a Gaussian mixture -> BIC gate -> soft keep
    of the likely-clean (Gumbel top-k on P(clean), capped by the estimated noise share) ->
    among them random order (prune='random') or InfoBatch (prune='infobatch').
    share='null': the noise share comes from the swap null (``SwapNullShare``) instead of the
    loss mixture, and there is no gate: a share that rounds to no row drops none.
    draw='rank' (with share='null'): the rows dropped as noisy are the share's count of most
    evidence (``rank_tiers``), no mixture and no soft draw. draw='lfdr' (with share='null' and
    the one feature 'swap'): each row dropped with its own probability, the local false
    discovery rate of ``swap_rank`` under its known null (``null_posterior``, ``posterior_tiers``),
    at most the share's count, and the dropped rows ordered by a draw in proportion to P(clean)
    (not by rank) for a step that keeps more than escaped the drop; no mixture. And it drops
    nothing while the share leaves fewer rows than the step keeps (1 - share < keep_ratio):
    guard=True, which swap_lfdr has and swap_guard adds to swap_null's drop by rank.

    Returns a key for the selector's top-k (largest kept): 2 + u for a likely-clean row it must
    keep first (InfoBatch: above the clean rows' mean loss), 1 + u for a likely-clean row it may
    prune at random, rank/G in [0, 1) for a row dropped as noisy (the least noisy first, should
    the kept set need more rows than the clean ones).
    """

    def __init__(
        self,
        features: tuple[str, ...],
        prune: str,
        opt: RuleOptions,
        store_size: int,
        rank: int,
        world: int,
        share: str = "bic",
        draw: str = "soft",
        guard: bool = False,
    ):
        assert set(features) <= {"loss", "gsc", "trend", "swap", "swap_mean"}, features
        assert prune in ("random", "infobatch"), prune
        assert share in ("bic", "null"), share
        # a rank needs a share that does not come from a mixture of the same evidence
        assert draw == "soft" or (draw in ("rank", "lfdr") and share == "null"), (draw, share)
        assert draw != "lfdr" or features == ("swap",), (draw, features)
        assert not guard or share == "null", (guard, share)
        self.features, self.prune, self.opt, self.draw = features, prune, opt, draw
        self.guard = guard
        self.gate = BicGate(opt.gate_momentum)
        self.null = SwapNullShare(opt.gate_momentum) if share == "null" else None
        self.filtering = False  # did this step drop rows as noisy (or could it, by its share)
        self.trend = (
            MarginTrend(store_size, rank, world, opt.margin_momentum)
            if "trend" in features
            else None
        )
        self.visits = (
            VisitMean(store_size, rank, world, opt.visit_momentum)
            if "swap_mean" in features
            else None
        )
        self.learned_G: torch.Tensor | None = None  # the step's prunable group (InfoBatch)

    def evidence(
        self, x
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(noise evidence [G, F] of the rule's features, the standardised FN-aware loss [G] and
        the loss itself [G] where a feature, the BIC share or InfoBatch needs them, the
        ``swap_rank`` [G] where the swap null or a feature needs it; None where not needed) of
        the gathered rows; high evidence = noisy."""
        img, txt, scale = x.feats
        same = same_caption(txt, self.opt.same_caption_cos)
        z_loss = loss = None
        if "loss" in self.features or self.null is None or self.prune == "infobatch":
            loss = fn_aware_loss(img, txt, scale, same).cpu()
            z_loss = standardise_min(box_cox(loss), x.cluster_G, self.opt.min_cluster_rows)
        cols = []
        if "loss" in self.features:
            cols.append(z_loss)
        if "gsc" in self.features:
            temp = self.opt.gsc_temperature or 1.0 / float(scale)
            cols.append(-standardise_min(structure_consistency(img, txt, temp).cpu(), None, 2))
        if "trend" in self.features:
            cols.append(margin_evidence(*self.trend(x.uid_G, margin(img, txt, same).cpu())))
        need_swap = self.null is not None or {"swap", "swap_mean"} & set(self.features)
        swap_G = swap_rank(img, txt, same) if need_swap else None
        if "swap" in self.features:  # the swap null's own statistic: how far its caption ranks
            cols.append(swap_G)
        if "swap_mean" in self.features:  # ... averaged over the sample's visits so far
            cols.append(self.visits(x.uid_G, swap_G))
        return torch.stack(cols, dim=1), z_loss, loss, swap_G

    def key(self, x) -> torch.Tensor:
        ev_GF, z_loss, loss_G, swap_G = self.evidence(x)
        G = ev_GF.shape[0]
        gen = torch.Generator().manual_seed(x.seed)
        u = torch.rand(2, G, generator=gen, dtype=torch.float64)
        noisy = torch.zeros(G, dtype=torch.bool)
        ev_G = ev_GF.sum(1)
        suspicion = ev_G  # the order of the dropped rows: most suspect kept last
        # Whether there is noise, and how much: the loss's one- vs two-component BIC and its
        # mixture's noise share (noisy pairs form a high-loss mode: NCR, DivideMix). Consistency
        # and margins are bounded and skewed even on clean data, so they only rank the rows.
        # ... or (share='null') from the swap null: no mixture decides whether, nor how much
        two_loss = None
        if self.null is not None:
            share = self.null.observe(swap_G)
            self.filtering = round(share * G) >= 1
            if self.guard:
                # the null's share is an upper bound of the noise; while it leaves fewer rows
                # than the step keeps, the model does not yet tell its clean pairs from swaps,
                # and any fill by its evidence is its easiest pairs: keep a random share
                self.filtering = self.filtering and 1 - share >= self.opt.keep_ratio
        else:
            two_loss = fit_gmm(z_loss[:, None], 2)
            self.filtering = self.gate.observe(bic_gain(fit_gmm(z_loss[:, None], 1), two_loss, G))
            share = float(two_loss.weight_K[int(torch.argmax(two_loss.mean_KF[:, 0]))])
        if self.filtering and self.draw == "rank":
            noisy = rank_tiers(ev_G, share)
        elif self.filtering and self.draw == "lfdr":
            p_null = null_posterior(swap_G, share)
            noisy = posterior_tiers(p_null, share, swap_G, u[0])
            # should the step keep more rows than escaped the drop (a share near 1: a weak
            # model), it takes dropped rows by a second draw in proportion to P(clean), not by
            # rank, which would keep a weak model's easiest pairs
            fill_u = torch.rand(G, generator=gen, dtype=torch.float64)
            suspicion = -gumbel_keys((1 - p_null).clamp_min(1e-300).log(), 1.0, fill_u)
        elif self.filtering:
            same_fit = two_loss is not None and self.features == ("loss",)
            fit = two_loss if same_fit else fit_gmm(ev_GF, 2)
            noisy = soft_tiers(1 - mixture_noisy(fit, ev_GF), share, self.opt.gamma, u[0])
        clean = ~noisy
        key = 1.0 + u[1]
        self.learned_G = None
        # InfoBatch only on rows the mixture calls clean: with the gate closed there is no noise
        # model, and 'above the mean loss' would keep the noisy rows first
        if self.prune == "infobatch" and self.filtering and bool(clean.any()):
            self.learned_G = clean & (loss_G < loss_G[clean].mean())
            key = torch.where(self.learned_G, key, key + 1.0)
        # rows dropped as noisy: below every clean row, least suspect first
        rank = torch.argsort(torch.argsort(-suspicion))
        return torch.where(noisy, rank.double() / G, key)

    def weights(self, kept_G: torch.Tensor) -> torch.Tensor | None:
        """Per-row loss weights [G] of the step's kept rows (InfoBatch), or None (all 1)."""
        if self.learned_G is None:
            return None
        return infobatch_weights(self.learned_G, kept_G.cpu())

    def stats(self) -> dict[str, float]:
        if self.null is not None:
            st = self.null.stats()
            return {**st, "select/filtering": float(self.filtering)} if st else {}
        return self.gate.stats()

    def state_dict(self) -> dict:
        return {
            "gate": self.gate.state_dict(),
            "null": self.null.state_dict() if self.null is not None else None,
            "trend": self.trend.state_dict() if self.trend is not None else None,
            "visits": self.visits.state_dict() if self.visits is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.gate.load_state_dict(sd["gate"])
        if self.null is not None:
            self.null.load_state_dict(sd["null"])
        if self.trend is not None:
            self.trend.load_state_dict(sd["trend"])
        if self.visits is not None:
            self.visits.load_state_dict(sd["visits"])


class RuleSpec(NamedTuple):
    features: tuple[str, ...]  # the noise evidence
    prune: str  # among the likely-clean: "random" or "infobatch"
    share: str = "bic"  # the noise share and whether to filter: "bic" (loss mixture) or "null"
    draw: str = "soft"  # the rows dropped as noisy: "soft" (Gumbel on the mixture's P(clean)),
    # "rank" (most evidence), "lfdr" (each with the swap null's local false discovery rate)
    guard: bool = False  # (share='null') drop nothing while 1 - share < selection.ratio


RULES: dict[str, RuleSpec] = {
    "filter_soft": RuleSpec(("loss",), "random"),
    "gsc": RuleSpec(("gsc",), "random"),
    "margin_trend": RuleSpec(("trend",), "random"),
    "filter_2d": RuleSpec(("loss", "gsc"), "random"),
    "infobatch": RuleSpec(("loss", "gsc"), "infobatch"),
    "gsc_null": RuleSpec(("gsc",), "random", "null"),
    "gsc_rank": RuleSpec(("gsc",), "random", "null", "rank"),
    "swap_null": RuleSpec(("swap",), "random", "null", "rank"),
    "swap_mean": RuleSpec(("swap_mean",), "random", "null", "rank"),
    "swap_lfdr": RuleSpec(("swap",), "random", "null", "lfdr", guard=True),
    "swap_guard": RuleSpec(("swap",), "random", "null", "rank", guard=True),
}


def make_rule(name: str, sc, store_size: int, rank: int, world: int) -> MixtureRule:
    """The rule object of method ``name`` from the selection config."""
    spec = RULES[name]
    opt = RuleOptions(
        gamma=sc.soft_gamma,
        min_cluster_rows=sc.min_cluster_rows,
        same_caption_cos=sc.same_caption_cos,
        gsc_temperature=sc.gsc_temperature,
        margin_momentum=sc.margin_momentum,
        gate_momentum=sc.split_momentum,
        visit_momentum=sc.visit_momentum,
        keep_ratio=sc.ratio,
    )
    return spec_rule(spec, opt, store_size, rank, world)


def spec_rule(spec: RuleSpec, opt: RuleOptions, store_size: int, rank: int, world: int):
    """The rule object of ``spec`` with options ``opt`` (what make_rule builds from the config)."""
    return MixtureRule(
        spec.features, spec.prune, opt, store_size, rank, world, spec.share, spec.draw, spec.guard
    )
