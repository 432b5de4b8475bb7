"""The scoring forward: no-grad features of a super-batch, chunked, current or historical weights.

Shapes: N rows scored on this rank, D feature dim, c = selection.score_chunk rows per forward.

    scorer = Scorer(engine, chunk=512, precision="fp32")
    img_ND, txt_ND, scale = scorer.features(images, tokens)
    s_N = scorer.historical_s(batch, rows_N, weights)      # correlation under other weights
    scorer.take_seconds()                                  # forward time since the last call

Every forward runs under no_grad. ``forward_s`` accumulates the time spent in forwards (device
synchronised), so the selector can report scoring time apart from bookkeeping even when a
historical forward happens in the middle of selection (the snapshot memo).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from pipeline.collectives import all_reduce_max
from pipeline.selection.methods import correlation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Scorer:
    def __init__(self, engine, chunk: int, precision: str):
        self.engine = engine
        self.chunk = chunk
        self.precision = precision
        self.forward_s = 0.0

    def take_seconds(self) -> float:
        """Forward seconds since the last call (and reset)."""
        s, self.forward_s = self.forward_s, 0.0
        return s

    def _autocast(self):
        dev = self.engine.device
        # fp32 training still scores in bf16 on GPU: selection only needs a ranking
        if dev.type == "cuda" and self.precision == "fp32":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def features(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        n_chunks: int | None = None,
        pad: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Chunked no-grad forward -> (img_ND fp32, txt_ND fp32, logit_scale).

        ``n_chunks`` forces the number of forwards (ZeRO-3 needs every rank to run the same
        count); chunks beyond the data run on ``pad`` (one image, one token row) and are dropped.
        """
        t0 = time.perf_counter()
        N, c = images.shape[0], self.chunk
        n_chunks = n_chunks if n_chunks is not None else max(1, (N + c - 1) // c)
        imgs, txts, scale = [], [], None
        with self._autocast():
            for i in range(n_chunks):
                lo, hi = i * c, min((i + 1) * c, N)
                if lo >= N:  # padding forward, for collective lockstep only
                    self.engine.forward(*pad)
                    continue
                f_img, f_txt, scale = self.engine.forward(images[lo:hi], tokens[lo:hi])
                imgs.append(f_img.float())
                txts.append(f_txt.float())
        D = imgs[0].shape[1] if imgs else 1
        img = torch.cat(imgs) if imgs else torch.empty(0, D, device=self.engine.device)
        txt = torch.cat(txts) if txts else torch.empty(0, D, device=self.engine.device)
        sync(self.engine.device)
        self.forward_s += time.perf_counter() - t0
        return img, txt, scale

    @torch.no_grad()
    def historical_s(self, batch: dict, rows_N: torch.Tensor, weights) -> torch.Tensor:
        """Correlation of the given local rows under ``weights`` (a WeightHistory). [N] on CPU.

        A collective: every rank calls it, with however many rows it has (maybe none).
        """
        n_max = all_reduce_max(len(rows_N))
        if n_max == 0:
            return torch.empty(0)
        n_chunks = (n_max + self.chunk - 1) // self.chunk
        dev_rows = rows_N.to(batch["images"].device)
        pad = (batch["images"][:1], batch["tokens"][:1])
        with weights.weights():
            img, txt, _ = self.features(
                batch["images"][dev_rows], batch["tokens"][dev_rows], n_chunks, pad
            )
        return correlation(img, txt).cpu()
