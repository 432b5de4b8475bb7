"""Selection diagnostics: noise AUC, kept-label entropy, the most-rejected pairs grid."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw


def rank_auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count half."""
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    allv = np.concatenate([pos_scores, neg_scores])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sorted_v = allv[order]
    # average ranks over ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    r_pos = ranks[:n_pos].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noise_auc(key_G: torch.Tensor, noisy_G: torch.Tensor, largest: bool) -> float:
    """How well the selection key ranks clean pairs ahead of noisy ones (1 = perfectly, 0.5 = chance)."""
    key = key_G.detach().double().cpu().numpy()
    if not largest:
        key = -key
    noisy = noisy_G.cpu().numpy().astype(bool)
    return rank_auc(key[~noisy], key[noisy])


def label_entropy(labels: torch.Tensor) -> float:
    labels = labels[labels >= 0]
    if labels.numel() == 0:
        return float("nan")
    counts = torch.bincount(labels).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def kept_label_entropy(label_G: torch.Tensor, kept_G: torch.Tensor) -> float:
    """Entropy of the kept labels relative to the super-batch's (1 = same class mix)."""
    full = label_entropy(label_G)
    if not np.isfinite(full) or full == 0:
        return float("nan")
    return label_entropy(label_G[kept_G]) / full


def rejected_grid(images_NCHW: torch.Tensor, captions: list[str], n: int = 8) -> np.ndarray:
    """A strip of images with their captions under them, as an HWC uint8 array."""
    imgs = images_NCHW[:n].detach().float().cpu()
    # undo any normalisation for display: rescale each image to [0, 1]
    lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
    hi = imgs.amax(dim=(1, 2, 3), keepdim=True)
    imgs = ((imgs - lo) / (hi - lo + 1e-6)).clamp(0, 1)
    tile = 128
    canvas = Image.new("RGB", (tile * len(imgs), tile + 48), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(imgs):
        arr = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(arr).resize((tile, tile)), (i * tile, 0))
        text = "\n".join(textwrap.wrap(captions[i] if i < len(captions) else "", 20)[:3])
        draw.text((i * tile + 2, tile + 2), text, fill="black")
    return np.asarray(canvas)
