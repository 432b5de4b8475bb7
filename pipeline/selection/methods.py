"""Selection methods: each is a score function over the gathered super-batch plus a direction.

A new method is one small function here, one line in METHODS and its name in names.py (the
config reads that list without importing torch; an import-time check ties the two).
Inputs (G gathered rows):
    s_G        current correlation 100 * max(cos(img, txt), 0)
    h_G        historical correlation (methods with needs_h: dissect, dissect_z)
    feats      (img_GD, txt_GD, logit_scale) gathered features (loss-based methods only)
    rand_G     uniform noise drawn identically on every rank
    cluster_G  caption cluster of each row (selection.balance=clusters), else None
    noisy_G    ground-truth noisy flag, given only to a method with needs_truth (the oracle):
               no selection rule may read it, nor the labels
    gate       the run's SplitGate, given to a method with gated=True (state kept across steps)
    uid_G, visits  sample ids and the run's VisitMean, for a method with needs_visits=True
    rule, seed     the run's rule object (rules.MixtureRule, state kept across steps) and the
                   step's seed for its draws, for a method with rule=True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.selection.names import SELECTION_METHODS
from pipeline.selection.rules import RULES, MixtureRule, RunningGate, VisitMean, standardise


@dataclass
class ScoreInputs:
    s_G: torch.Tensor | None = None
    h_G: torch.Tensor | None = None
    feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    rand_G: torch.Tensor | None = None
    history: str = "memory"
    cluster_G: torch.Tensor | None = None
    noisy_G: torch.Tensor | None = None
    gate: SplitGate | None = None  # methods with gated=True
    uid_G: torch.Tensor | None = None
    visits: VisitMean | None = None  # methods with needs_visits=True
    rule: MixtureRule | None = None  # methods with rule=True
    seed: int = 0  # the step's seed (rule draws), equal on every rank


@dataclass(frozen=True)
class Method:
    score: Callable[[ScoreInputs], torch.Tensor]
    largest: bool  # keep the largest keys (else the smallest)
    needs_s: bool = False
    needs_feats: bool = False
    needs_h: bool = False  # reads a historical source (selection.history)
    needs_truth: bool = False  # reads the ground-truth noisy flag: benchmarks only
    gated: bool = False  # filters only while a SplitGate says the noise split is real
    needs_visits: bool = False  # averages a per-sample value over visits (VisitMean)
    rule: bool = False  # a rules.MixtureRule object owns the key (and loss weights, InfoBatch)


def correlation(img_ND: torch.Tensor, txt_ND: torch.Tensor) -> torch.Tensor:
    """s = 100 * max(cos, 0) per pair, in fp32."""
    cos = F.cosine_similarity(img_ND.float(), txt_ND.float(), dim=-1)
    return 100.0 * cos.clamp_min(0.0)


def differential(s_G: torch.Tensor, h_G: torch.Tensor, centred: bool = True) -> torch.Tensor:
    """d = (h - mean h) - (s - mean s) over the global super-batch; score_ema uses h - s."""
    s, h = s_G.double(), h_G.double()
    if centred:
        return ((h - h.mean()) - (s - s.mean())).float()
    return (h - s).float()


def per_sample_clip_loss(
    img_GD: torch.Tensor, txt_GD: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of each pair against the rest of the gathered super-batch. [G]"""
    logits = logit_scale.float() * img_GD.float() @ txt_GD.float().T
    target = torch.arange(logits.shape[0], device=logits.device)
    li = F.cross_entropy(logits, target, reduction="none")
    lt = F.cross_entropy(logits.T, target, reduction="none")
    return 0.5 * (li + lt)


def _random(x: ScoreInputs) -> torch.Tensor:
    return x.rand_G


def _clipscore(x: ScoreInputs) -> torch.Tensor:
    return x.s_G


def _loss(x: ScoreInputs) -> torch.Tensor:
    return per_sample_clip_loss(*x.feats)


def _dissect(x: ScoreInputs) -> torch.Tensor:
    return differential(x.s_G, x.h_G, centred=x.history != "score_ema")


@dataclass
class Mixture:
    """A two-component 1-D Gaussian mixture fitted to per-sample values."""

    clean_G: torch.Tensor  # P(low component) of each row
    separation: float  # Ashman's D: |mu_1 - mu_2| / sqrt((var_1 + var_2) / 2)


def fit_mixture(z_G: torch.Tensor, iters: int = 30) -> Mixture:
    """Two-component mixture fitted by EM (started at the quartiles), as NCR / DivideMix split
    clean from noisy pairs by loss; the low-mean component is the clean one."""
    z = z_G.double()
    mu = torch.quantile(z, torch.tensor([0.25, 0.75], dtype=torch.float64))
    var = torch.full((2,), float(z.var().clamp_min(1e-6)) / 4, dtype=torch.float64)
    pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for _ in range(iters):
        logp = -0.5 * (z[:, None] - mu) ** 2 / var - 0.5 * var.log() + pi.log()
        resp = torch.softmax(logp, dim=1)
        nk = resp.sum(0).clamp_min(1e-9)
        pi = (nk / nk.sum()).clamp_min(1e-6)
        mu = (resp * z[:, None]).sum(0) / nk
        var = ((resp * (z[:, None] - mu) ** 2).sum(0) / nk).clamp_min(1e-6)
    separation = float((mu[0] - mu[1]).abs() / ((var[0] + var[1]) / 2).sqrt())
    return Mixture(resp[:, int(torch.argmin(mu))], separation)


class SplitGate(RunningGate):
    """Whether there is noise to filter: are the loss mixture's two components well separated?

    A two-component fit splits any sample, noisy or clean, so a filter that always believes it
    drops the hardest clean pairs when there is no noise (measured: -3.5 points on clean data).
    Ashman's D says how far apart the fitted components are (D > 2 is the textbook bound for a
    clean split). One super-batch's D is noisy and biased up in small batches, so the gate
    follows its running mean (momentum m, started at the first value) and opens above min_d.
    Measured with tiny-vit on Fashion-MNIST (super-batches of 128, 16 clusters): D 1.4-2.0 on
    clean pairs, 2.7-4.5 with 40% swapped captions, from the end of a 3-epoch warm-up on. With
    about 4 rows per cluster (the digits benchmark: 64 rows, 16 clusters) clean data exceeded
    2.5 too: the threshold depends on the rows each cluster standardises over.
    The same on every rank: D comes from the gathered super-batch. min_d = 0 always filters.
    """

    def __init__(self, min_d: float, momentum: float):
        super().__init__(min_d, momentum, "select/split_d")


def _oracle(x: ScoreInputs) -> torch.Tensor:
    # clean rows in [1, 2), noisy in [0, 1): clean first, random order inside each
    return (~x.noisy_G.cpu()).double() + x.rand_G.double()


def _dissect_z(x: ScoreInputs) -> torch.Tensor:
    # Standardising h and s separately puts them on the same scale: the published rule keeps the
    # largest h - s, and with a weak history (h barely varies) that is "keep the lowest s", i.e.
    # keep the noisy pairs; here h counts as much as s whatever their spreads.
    return (standardise(x.h_G) - standardise(x.s_G)).float()


def _filter(x: ScoreInputs, z_G: torch.Tensor) -> torch.Tensor:
    # Only when the split is real (SplitGate): on clean data this is random selection.
    mix = fit_mixture(z_G)
    if not x.gate.observe(mix.separation):
        return x.rand_G.double()
    return (mix.clean_G > 0.5).double() + x.rand_G.double()


def _cluster_z(x: ScoreInputs) -> torch.Tensor:
    # Loss standardised within each caption cluster, so an easy concept's pairs are not all
    # called clean and a hard concept's all noisy.
    return standardise(per_sample_clip_loss(*x.feats), x.cluster_G)


def _filter_random(x: ScoreInputs) -> torch.Tensor:
    # Random among the likely-clean: keeps the class mix and does not favour the already-learned
    # easy pairs as small_loss does.
    return _filter(x, _cluster_z(x))


def _filter_visits(x: ScoreInputs) -> torch.Tensor:
    # filter_random on each sample's standardised loss averaged over its visits: a noisy pair's
    # loss is high at every visit, a clean pair's only now and then (augmentation, a passing
    # state of the model), so the average separates them better (as AUM and O2U-Net average
    # over epochs). A sample seen once (single-pass data) is filter_random.
    return _filter(x, x.visits(x.uid_G, _cluster_z(x)))


def _rule(x: ScoreInputs) -> torch.Tensor:
    return x.rule.key(x)


METHODS: dict[str, Method] = {
    "random": Method(_random, largest=True),
    "clipscore": Method(_clipscore, largest=True, needs_s=True),
    "small_loss": Method(_loss, largest=False, needs_feats=True),
    "big_loss": Method(_loss, largest=True, needs_feats=True),
    "dissect": Method(_dissect, largest=True, needs_s=True, needs_h=True),
    "dissect_z": Method(_dissect_z, largest=True, needs_s=True, needs_h=True),
    "filter_random": Method(_filter_random, largest=True, needs_feats=True, gated=True),
    "filter_visits": Method(
        _filter_visits, largest=True, needs_feats=True, gated=True, needs_visits=True
    ),
    **{name: Method(_rule, largest=True, needs_feats=True, rule=True) for name in RULES},
    "oracle": Method(_oracle, largest=True, needs_truth=True),
}
# the config validates selection.method against names.SELECTION_METHODS: the same set
assert set(METHODS) == set(SELECTION_METHODS) - {"none"}, set(METHODS) ^ set(SELECTION_METHODS)
