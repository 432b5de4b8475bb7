"""The training loss: open_clip's ClipLoss, with optional per-row weights (InfoBatch rescaling).

Shapes: b rows on this rank, D feature dim, W ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import ClipLoss


class WeightedClipLoss(ClipLoss):
    """ClipLoss (local loss, features gathered with grad) where each local row's symmetric
    InfoNCE may carry a weight: ``mean_i w_i (CE_img_i + CE_txt_i) / 2`` over this rank's b rows,
    which is ClipLoss's value when every w_i = 1 (and ClipLoss itself is used when weight_b is
    None). The negatives are still every rank's rows; only each row's own term is weighted."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    def forward(self, img_bD, txt_bD, logit_scale, weight_b: torch.Tensor | None = None):
        if weight_b is None:
            return super().forward(img_bD, txt_bD, logit_scale)
        logits_img, logits_txt = self.get_logits(img_bD, txt_bD, logit_scale)
        labels = self.get_ground_truth(img_bD.device, logits_img.shape[0])
        per_row = 0.5 * (
            F.cross_entropy(logits_img, labels, reduction="none")
            + F.cross_entropy(logits_txt, labels, reduction="none")
        )
        return (weight_b.to(per_row) * per_row).mean()
