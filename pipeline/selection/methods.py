"""Selection methods: each is a score function over the gathered super-batch plus a direction.

A new method is one small function here and one line in METHODS. Inputs (G gathered rows):
    s_G        current correlation 100 * max(cos(img, txt), 0)
    h_G        historical correlation (dissect only)
    feats      (img_GD, txt_GD, logit_scale) gathered features (loss-based methods only)
    rand_G     uniform noise drawn identically on every rank
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ScoreInputs:
    s_G: torch.Tensor | None = None
    h_G: torch.Tensor | None = None
    feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    rand_G: torch.Tensor | None = None
    history: str = "memory"


@dataclass(frozen=True)
class Method:
    score: Callable[[ScoreInputs], torch.Tensor]
    largest: bool  # keep the largest keys (else the smallest)
    needs_s: bool = False
    needs_feats: bool = False


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


def per_sample_clip_loss(img_GD: torch.Tensor, txt_GD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
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


METHODS: dict[str, Method] = {
    "random": Method(_random, largest=True),
    "clipscore": Method(_clipscore, largest=True, needs_s=True),
    "small_loss": Method(_loss, largest=False, needs_feats=True),
    "big_loss": Method(_loss, largest=True, needs_feats=True),
    "dissect": Method(_dissect, largest=True, needs_s=True),
}
