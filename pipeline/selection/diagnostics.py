"""Selection diagnostics: noise AUC, kept fractions per noise kind, kept-label entropy, the
agreement of the trained clean and noisy pairs, the most-rejected pairs grid, and the report
that writes them (step scalars, TensorBoard histograms and image, parquet sample log).

Shapes: B super-batch rows per rank, G = W * B gathered rows (rank-major).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.data.loader import NOISE_KINDS
from pipeline.selection.methods import correlation


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
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
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


def step_stats(
    g, key_G: torch.Tensor, kept_G: torch.Tensor, largest: bool, warm: bool, scored: bool
) -> dict:
    """The select/* scalars of one step (``g``: the step's Gathered rows)."""
    stats = {"select/warmup": float(warm), "select/kept_frac": float(kept_G.float().mean())}
    if g.noisy.any():
        stats["select/superbatch_noisy_frac"] = float(g.noisy.float().mean())
        stats["select/kept_noisy_frac"] = float(g.noisy[kept_G].float().mean())
        stats["select/noise_auc"] = noise_auc(key_G, g.noisy, largest)
    if g.noise_kind is not None:
        for i, kind in enumerate(NOISE_KINDS):
            rows = g.noise_kind == i
            if rows.any() and (g.noise_kind != i).any():  # one kind alone says nothing new
                stats[f"select/kept_frac/{kind}"] = float(kept_G[rows].float().mean())
    if (g.label >= 0).any():
        stats["select/kept_label_entropy"] = kept_label_entropy(g.label, kept_G)
    if scored:
        stats["select/s_mean"] = float(g.s.mean())
    return stats


# The trained pairs' agreement, per group: all clean, all noisy, then each noise kind.
PAIR_GROUPS = ("clean", "noisy", *NOISE_KINDS[1:])


def train_pair_sums(img_ND: torch.Tensor, txt_ND: torch.Tensor, batch: dict) -> torch.Tensor:
    """[sum of s, count] per PAIR_GROUPS of the rows just trained, flat [2 * groups] float32 on
    the features' device: s = correlation of the training forward's own features (no extra
    forward), so `none` shows memorisation too. Summed over ranks by the caller (in the step's
    one all-reduce), then `train_pair_stats`."""
    s_N = correlation(img_ND.detach(), txt_ND.detach())
    noisy = batch["noisy"].to(s_N.device)
    kind = batch.get("noise_kind", torch.full_like(batch["uid"], -1)).to(s_N.device)
    masks = torch.stack([~noisy, noisy, *(kind == i for i in range(1, len(NOISE_KINDS)))])
    return torch.stack([(masks * s_N).sum(1), masks.sum(1).float()], dim=1).flatten()


def train_pair_stats(sums: torch.Tensor) -> dict:
    """select/train_s/<group>: the mean s of each group's trained rows (groups with rows)."""
    out = {}
    for group, (total, n) in zip(PAIR_GROUPS, sums.view(-1, 2).tolist()):  # one host copy
        if n:
            out[f"select/train_s/{group}"] = total / n
    return out


class SelectionReport:
    """What selection shows beyond the step scalars; only the main rank records and writes.

    ``record`` keeps the last step (histograms, most-rejected grid) and appends per-sample rows;
    ``write(sink, step)`` (at log time) sends histograms, the grid every ``grid_every`` steps,
    and flushes the rows to ``log_dir/part-<step>.parquet``.
    """

    def __init__(self, log_dir: Path, is_main: bool, log_samples: bool, grid_every: int):
        self.log_dir, self.is_main = Path(log_dir), is_main
        self.log_samples, self.grid_every = log_samples, grid_every
        self.last: dict | None = None
        self.rows: list[dict] = []

    def record(
        self,
        step: int,
        epoch: int,
        g,
        key_G: torch.Tensor,
        kept_G: torch.Tensor,
        largest: bool,
        warm: bool,
        batch: dict,
        cluster_G: torch.Tensor | None = None,
    ) -> None:
        if not self.is_main:
            return
        G = g.uid.numel()
        cluster_G = cluster_G if cluster_G is not None else torch.full((G,), -1, dtype=torch.long)
        self.last = {
            "g": g,
            "key": key_G,
            "kept": kept_G,
            "largest": largest,
            "batch": batch,
            "cluster": cluster_G,
        }
        if self.log_samples:
            self.rows.append(
                {
                    "step": np.full(G, step, dtype=np.int64),
                    "epoch": np.full(G, epoch, dtype=np.int32),
                    "uid": g.uid.numpy(),
                    "s": g.s.numpy(),
                    "h": g.h.numpy(),
                    "d": key_G.float().numpy(),
                    "kept": kept_G.numpy(),
                    "noisy": g.noisy.numpy(),
                    "warmup": np.full(G, warm),
                    "cluster": cluster_G.numpy(),  # -1: no balance, or warm-up
                }
            )

    def histograms(self) -> dict:
        if self.last is None:
            return {}
        g = self.last["g"]
        return {
            "select/hist_s": g.s.numpy(),
            "select/hist_h": g.h.numpy(),
            "select/hist_key": self.last["key"].float().numpy(),
        }

    def rejected(self, n: int = 8):
        """(HWC image, captions) of this rank's most-rejected pairs in the last step, or None."""
        if self.last is None:
            return None
        g, batch = self.last["g"], self.last["batch"]
        key = self.last["key"][g.mine()].double()
        kept = self.last["kept"][g.mine()]
        key = key if self.last["largest"] else -key
        key[kept] = float("inf")
        order = torch.argsort(key)[: min(n, int((~kept).sum()))]
        if len(order) == 0:
            return None
        imgs = batch["images"][order.to(batch["images"].device)]
        caps = [batch["captions"][i] for i in order.tolist()]
        return rejected_grid(imgs, caps, n), caps

    def flush(self, step: int) -> None:
        if not self.rows:
            return
        import pandas as pd

        df = pd.DataFrame({k: np.concatenate([r[k] for r in self.rows]) for k in self.rows[0]})
        df.to_parquet(self.log_dir / f"part-{step:08d}.parquet", index=False)
        self.rows.clear()

    def write(self, sink, step: int) -> None:
        if not self.is_main:
            return
        for tag, vals in self.histograms().items():
            sink.histogram(tag, vals, step)
        self.flush(step)
        if self.grid_every and step % self.grid_every == 0:
            grid = self.rejected()
            if grid is not None:
                sink.image("select/most_rejected", grid[0], step)
                sink.text("select/most_rejected_captions", "\n\n".join(grid[1]), step)
