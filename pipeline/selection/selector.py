"""One selection step: score the super-batch, gather, global top-k, rebalance.

Shapes: B super-batch rows on this rank, b = r * B train rows, W ranks, G = W * B gathered rows
(rank-major), D feature dim. Everything here runs under no_grad.

    sel = Selector(cfg, engine, dist, store_size, steps_per_epoch)
    train_batch, stats = sel.select(batch, step)      # stats: select/* and perf/* scalars
    ... train on train_batch ...
    sel.after_step(step)                              # EMA update
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch

from pipeline.collectives import all_gather_cat, all_reduce_max
from pipeline.config import Config
from pipeline.dist import DistInfo
from pipeline.selection import diagnostics as diag
from pipeline.selection.history import WeightHistory
from pipeline.selection.methods import METHODS, ScoreInputs, correlation
from pipeline.selection.store import ScoreStore
from pipeline.selection.topk import apply_rebalance, global_topk, plan_rebalance


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Selector:
    def __init__(self, cfg: Config, engine, dist: DistInfo, store_size: int, steps_per_epoch: int):
        self.cfg = cfg
        self.sc = cfg.selection
        self.engine = engine
        self.dist = dist
        self.method = METHODS[self.sc.method]
        self.b = cfg.data.batch_size
        self.B = cfg.super_batch_size
        self.warmup_steps = max(self.sc.warmup_steps, int(round(self.sc.warmup_epochs * steps_per_epoch)))
        self.history = self.sc.history if self.sc.method == "dissect" else None
        self.store = None
        if self.history in ("memory", "snapshot", "score_ema"):
            self.store = ScoreStore(store_size, dist.rank, dist.world_size)
        self.weights = None
        if self.history in ("snapshot", "ema"):
            self.weights = WeightHistory(engine, momentum=self.sc.ema_momentum)
        self.log_rows: list[dict] = []  # per-sample log, drained by the trainer (rank 0)

    # --- scoring ----------------------------------------------------------------------------------

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def _autocast(self):
        dev = self.engine.device
        if dev.type == "cuda" and self.cfg.deepspeed.precision == "fp32":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def _features(self, images: torch.Tensor, tokens: torch.Tensor, n_chunks: int | None = None,
                  pad: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Chunked no-grad forward -> (img [N, D] fp32, txt [N, D] fp32, logit_scale).

        ``n_chunks`` forces the number of forwards (ZeRO-3 needs every rank to run the same
        count); chunks beyond the data run on ``pad`` (one image, one token row) and are dropped.
        """
        N, c = images.shape[0], self.sc.score_chunk
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
        return img, txt, scale

    def _historical_s(self, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """Correlation of the given local rows under the historical weights. [len(rows)]"""
        n_max = all_reduce_max(len(rows))
        if n_max == 0:
            return torch.empty(0)
        n_chunks = (n_max + self.sc.score_chunk - 1) // self.sc.score_chunk
        dev_rows = rows.to(batch["images"].device)
        pad = (batch["images"][:1], batch["tokens"][:1])
        with self.weights.weights():
            img, txt, _ = self._features(batch["images"][dev_rows], batch["tokens"][dev_rows], n_chunks, pad)
        return correlation(img, txt).cpu()

    # --- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def select(self, batch: dict, step: int, epoch: int = 0) -> tuple[dict, dict]:
        W, rank, B, b = self.dist.world_size, self.dist.rank, self.B, self.b
        dev = self.engine.device
        assert batch["uid"].shape[0] == B, (batch["uid"].shape, B)
        warm = self.in_warmup(step)
        m = self.method
        if self.history in ("snapshot", "ema") and not warm and not self.weights.ready:
            self.weights.snapshot()  # end of warm-up (snapshot) or the first EMA step
        stats: dict = {}

        # 1. score with the current model (only what the method or the store needs)
        t0 = time.perf_counter()
        need_s = (m.needs_s and not warm) or (self.history in ("memory", "score_ema"))
        need_feats = m.needs_feats and not warm
        s_B = torch.zeros(B)
        feats = None
        if need_s or need_feats:
            img, txt, scale = self._features(batch["images"], batch["tokens"])
            s_B = correlation(img, txt).cpu()
            if need_feats:
                feats = (img, txt, scale)
        h_B = torch.zeros(B)
        if self.history == "ema" and not warm:
            h_B = self._historical_s(batch, torch.arange(B))
        _sync(dev)
        t1 = time.perf_counter()

        # 2. gather (uid, s, h, noisy, label) from all ranks: one [B, 5] float64 all-gather
        local = torch.stack([batch["uid"].double(), s_B.double(), h_B.double(),
                             batch["noisy"].double(), batch["label"].double()], dim=1)
        g = all_gather_cat(local)
        uid_G, s_G, h_G = g[:, 0].long(), g[:, 1].float(), g[:, 2].float()
        noisy_G, label_G = g[:, 3] > 0.5, g[:, 4].long()

        # 3. historical correlation from the store
        if self.history in ("memory", "snapshot") and not warm or self.history == "score_ema":
            h_G, known_G = self.store.read(uid_G)
            if self.history == "snapshot":
                mine = slice(rank * B, (rank + 1) * B)
                todo = torch.nonzero(~known_G[mine]).flatten()
                t_h = time.perf_counter()
                h_new = torch.zeros(B)
                h_new[todo] = self._historical_s(batch, todo)
                t1 += time.perf_counter() - t_h  # count this forward as scoring time
                new_G = all_gather_cat(torch.stack([h_new.double(), torch.zeros(B, dtype=torch.float64).index_fill_(0, todo, 1.0)], 1))
                fresh = new_G[:, 1] > 0.5
                h_G = torch.where(fresh, new_G[:, 0].float(), h_G)
                self.store.write(uid_G, h_G, only=fresh)
                known_G = known_G | fresh
            # never-seen samples (no warm-up pass over them): neutral h = s
            h_G = torch.where(known_G, h_G, s_G)

        # 4. the key and the global top-k
        if warm or self.sc.method == "random":
            gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step)
            key_G, largest = torch.rand(W * B, generator=gen), True
        else:
            if feats is not None:
                img_G = all_gather_cat(feats[0])
                txt_G = all_gather_cat(feats[1])
                feats = (img_G, txt_G, feats[2].detach())
            inputs = ScoreInputs(s_G=s_G, h_G=h_G, feats=feats, history=self.history or "")
            key_G, largest = m.score(inputs).cpu(), m.largest
        kept_G = global_topk(key_G, uid_G, W * b, largest=largest)

        # 5. store writes (owners only, no traffic)
        if self.history == "memory" and warm:
            self.store.write(uid_G, s_G)
        elif self.history == "score_ema":  # upstream: h <- m h + (1 - m) s after use; h = s at first sight
            mom = self.sc.score_momentum
            self.store.write(uid_G, mom * h_G + (1 - mom) * s_G)
        _sync(dev)
        t2 = time.perf_counter()

        # 6. rebalance so every rank trains exactly b
        plan = plan_rebalance(kept_G, W, b)
        train = apply_rebalance(batch, plan, rank, W)
        _sync(dev)
        t3 = time.perf_counter()

        # 7. diagnostics
        stats.update({
            "perf/score_s": t1 - t0,
            "perf/select_s": t2 - t1,
            "perf/rebalance_s": t3 - t2,
            "select/warmup": float(warm),
            "select/kept_frac": float(kept_G.float().mean()),
            "select/moved_frac": plan.moved / float(W * b),
        })
        if noisy_G.any():
            stats["select/superbatch_noisy_frac"] = float(noisy_G.float().mean())
            stats["select/kept_noisy_frac"] = float(noisy_G[kept_G].float().mean())
            stats["select/noise_auc"] = diag.noise_auc(key_G, noisy_G, largest)
        if (label_G >= 0).any():
            stats["select/kept_label_entropy"] = diag.kept_label_entropy(label_G, kept_G)
        if need_s:
            stats["select/s_mean"] = float(s_G.mean())
        self._last = {"s": s_G, "h": h_G, "key": key_G, "kept": kept_G, "uid": uid_G,
                      "largest": largest, "batch": batch, "rank": rank, "B": B}
        if self.sc.log_samples and self.dist.is_main:
            self.log_rows.append({
                "step": np.full(W * B, step, dtype=np.int64), "epoch": np.full(W * B, epoch, dtype=np.int32),
                "uid": uid_G.numpy(), "s": s_G.numpy(), "h": h_G.numpy(), "d": key_G.float().numpy(),
                "kept": kept_G.numpy(), "noisy": noisy_G.numpy(), "warmup": np.full(W * B, warm),
            })
        return train, stats

    def after_step(self, step: int) -> None:
        """Called after every optimizer step."""
        if self.history == "ema":
            self.weights.ema_update()

    # --- diagnostics for the sink -----------------------------------------------------------------

    def histograms(self) -> dict:
        last = getattr(self, "_last", None)
        if last is None:
            return {}
        return {"select/hist_s": last["s"].numpy(), "select/hist_h": last["h"].numpy(),
                "select/hist_key": last["key"].float().numpy()}

    def rejected_grid(self, n: int = 8):
        """(HWC image, captions) of this rank's most-rejected pairs in the last step, or None."""
        last = getattr(self, "_last", None)
        if last is None:
            return None
        B, r = last["B"], last["rank"]
        key = last["key"][r * B:(r + 1) * B].double()
        kept = last["kept"][r * B:(r + 1) * B]
        key = key if last["largest"] else -key
        key[kept] = float("inf")
        order = torch.argsort(key)[: min(n, int((~kept).sum()))]
        if len(order) == 0:
            return None
        imgs = last["batch"]["images"][order.to(last["batch"]["images"].device)]
        caps = [last["batch"]["captions"][i] for i in order.tolist()]
        return diag.rejected_grid(imgs, caps, n), caps

    # --- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "store": self.store.state_dict() if self.store is not None else None,
            "weights": self.weights.state_dict() if self.weights is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        if self.store is not None and sd.get("store") is not None:
            self.store.load_state_dict(sd["store"])
        if self.weights is not None and sd.get("weights") is not None:
            self.weights.load_state_dict(sd["weights"])
