"""One selection step: score the super-batch, gather, global top-k, rebalance.

Shapes: B super-batch rows on this rank, b = r * B train rows, W ranks, G = W * B gathered rows
(rank-major), D feature dim, K caption clusters. Everything here runs under no_grad.

    sel = Selector(cfg, engine, dist, store_size, steps_per_epoch)
    train_batch, stats = sel.select(batch, step)      # stats: select/* and perf/* scalars
    ... train on train_batch ...
    sel.after_step(step)                              # EMA update
    sel.report(sink, step)                            # at log time: histograms, grid, sample log

The parts, each chosen once from config: the method (methods.METHODS), the historical source
(sources.py), the scoring forward (scoring.py), the optional caption-cluster balance
(balance.py), and the report (diagnostics.SelectionReport).
"""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.collectives import all_gather_cat
from pipeline.config import Config, ConfigError
from pipeline.dist import DistInfo
from pipeline.selection import diagnostics as diag
from pipeline.selection.balance import ClusterBalance, balanced_topk, cluster_quotas, cluster_stats
from pipeline.selection.methods import METHODS, ScoreInputs, SplitGate, VisitMean, correlation
from pipeline.selection.rules import make_rule
from pipeline.selection.scoring import ScoreOptions, Scorer, sync
from pipeline.selection.sources import Gathered, make_source
from pipeline.selection.topk import apply_rebalance, global_topk, plan_rebalance, tie_draw

if TYPE_CHECKING:  # typing only: importing the engine imports deepspeed
    from pipeline.engine import Engine


def shards_carry_noisy_flag(spec) -> bool:
    """Whether the first sample of the first train shard has the ground-truth ``noisy`` field."""
    from pipeline.data import expand_shards

    with tarfile.open(expand_shards(spec)[0]) as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".json"):
                return "noisy" in json.loads(tf.extractfile(m).read())
    return False


class Selector:
    def __init__(
        self, cfg: Config, engine: Engine, dist: DistInfo, store_size: int, steps_per_epoch: int
    ):
        sc = self.sc = cfg.selection
        self.cfg, self.engine, self.dist = cfg, engine, dist
        self.method = METHODS[sc.method]
        self.b, self.B = cfg.data.batch_size, cfg.super_batch_size
        self.warmup_steps = max(sc.warmup_steps, int(round(sc.warmup_epochs * steps_per_epoch)))
        if self.method.needs_truth and not shards_carry_noisy_flag(cfg.data.train):
            raise ConfigError(
                f"selection.method={sc.method} ranks by the ground-truth noisy flag, but the train shards "
                f"({cfg.data.train}) carry none: it is for benchmarks on noise-injected data "
                "(dissect-prep demo / dissect-prep noise)"
            )
        G = dist.world_size * self.B
        if sc.balance == "clusters" and sc.clusters > G:
            raise ConfigError(
                f"selection.clusters must be at most the global super-batch ({G} rows), "
                f"got {sc.clusters}"
            )
        self.balance = (
            ClusterBalance(sc.clusters, cfg.run.seed) if sc.balance == "clusters" else None
        )
        self.gate = SplitGate(sc.split_min_d, sc.split_momentum) if self.method.gated else None
        self.visits = (
            VisitMean(store_size, dist.rank, dist.world_size, sc.visit_momentum)
            if self.method.needs_visits
            else None
        )
        self.rule = (
            make_rule(sc.method, sc, store_size, dist.rank, dist.world_size)
            if self.method.rule
            else None
        )
        self.source = make_source(
            sc.history if self.method.needs_h else None,
            engine,
            store_size,
            dist.rank,
            dist.world_size,
            sc.ema_momentum,
            sc.score_momentum,
        )
        options = ScoreOptions(
            patch_dropout=sc.score_patch_dropout,
            image_size=sc.score_image_size,
            trim_tokens=sc.score_trim_tokens,
            lean=sc.score_lean,
        )
        self.scorer = Scorer(engine, sc.score_chunk, cfg.deepspeed.precision, options)
        self.reporter = diag.SelectionReport(
            Path(cfg.run.dir) / "selection", dist.is_main, sc.log_samples, sc.grid_every_steps
        )

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    # --- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def select(self, batch: dict, step: int, epoch: int = 0) -> tuple[dict, dict]:
        W, B, b = self.dist.world_size, self.B, self.b
        assert batch["uid"].shape[0] == B, (batch["uid"].shape, B)
        warm = self.in_warmup(step)
        self.source.begin(warm)
        t0 = time.perf_counter()
        self.scorer.take_seconds()
        self.scorer.seed = self.cfg.run.seed * 1_000_003 + step  # patch-dropout draws
        scored, feats_B = self._score(batch, warm)
        g = self._gather(batch, scored, feats_B, self.source.local_h(self.scorer, batch, warm))
        g.h = self.source.gathered_h(self.scorer, batch, g, warm)
        rand_G, tie_G = self._draws(step, W * B)
        key_G, largest, cluster_G = self._key(g, feats_B, rand_G, warm, step)
        if cluster_G is None:
            kept_G = global_topk(key_G, tie_G, W * b, largest=largest)
        else:
            quota_K = cluster_quotas(cluster_G, self.sc.clusters, W * b)
            kept_G = balanced_topk(key_G, tie_G, cluster_G, quota_K, largest=largest)
        weight_G = self.rule.weights(kept_G) if self.rule is not None and not warm else None
        if weight_G is not None:  # per-row loss weights travel with their rows
            batch = {**batch, "weight": weight_G[self.dist.rank * B : (self.dist.rank + 1) * B]}
        self.source.update(g, warm)
        sync(self.engine.device)
        t1 = time.perf_counter()
        plan = plan_rebalance(kept_G, W, b)
        train = apply_rebalance(batch, plan, self.dist.rank, W)
        sync(self.engine.device)
        score_s = self.scorer.take_seconds()
        stats = {
            "perf/score_s": score_s,
            "perf/select_s": t1 - t0 - score_s,
            "perf/rebalance_s": time.perf_counter() - t1,
            "select/moved_frac": plan.moved / float(W * b),
            **diag.step_stats(g, key_G, kept_G, largest, warm, scored),
        }
        if cluster_G is not None:
            stats.update(cluster_stats(cluster_G, kept_G, self.sc.clusters))
        if self.gate is not None and not warm:
            stats.update(self.gate.stats())
        if self.rule is not None and not warm:
            stats.update(self.rule.stats())
        if weight_G is not None:
            stats["select/weight_max"] = float(weight_G[kept_G.cpu()].max())
        self.reporter.record(step, epoch, g, key_G, kept_G, largest, warm, batch, cluster_G)
        return train, stats

    def _score(self, batch: dict, warm: bool):
        """Current-model features of this rank's rows when anything needs them: (scored, feats)."""
        m = self.method
        need_feats = not warm and (m.needs_feats or self.balance is not None)
        need_s = need_feats or self.source.needs_s(warm) or (m.needs_s and not warm)
        if not need_s:
            return False, None
        return True, self.scorer.features(batch["images"], batch["tokens"])

    def _gather(self, batch: dict, scored: bool, feats_B, h_B) -> Gathered:
        """(uid, s, h, noisy, label, noise kind) of every rank's rows: one [B, 6] float64
        all-gather."""
        B = self.B
        s_B = correlation(feats_B[0], feats_B[1]).cpu() if scored else torch.zeros(B)
        h_B = h_B if h_B is not None else torch.zeros(B)
        local = torch.stack(
            [
                batch["uid"].double(),
                s_B.double(),
                h_B.double(),
                batch["noisy"].double(),
                batch["label"].double(),
                batch.get("noise_kind", torch.full((B,), -1)).double(),
            ],
            dim=1,
        )
        x = all_gather_cat(local)
        return Gathered(
            uid=x[:, 0].long(),
            s=x[:, 1].float(),
            h=x[:, 2].float(),
            noisy=x[:, 3] > 0.5,
            label=x[:, 4].long(),
            rank=self.dist.rank,
            B=B,
            noise_kind=x[:, 5].long(),
        )

    def _draws(self, step: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rand_G uniform keys, tie_G permutation), seeded by (run.seed, step): equal on all ranks."""
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step)
        return torch.rand(G, generator=gen), tie_draw(G, gen)

    def _key(self, g: Gathered, feats_B, rand_G: torch.Tensor, warm: bool, step: int):
        """(key_G, largest, cluster_G or None). Warm-up keeps a random r fraction, unbalanced."""
        if warm:
            return rand_G, True, None
        m = self.method
        txt_GD = (
            all_gather_cat(feats_B[1])
            if feats_B is not None and (m.needs_feats or self.balance is not None)
            else None
        )
        cluster_G = self.balance.assign(txt_GD) if self.balance is not None else None
        feats = (all_gather_cat(feats_B[0]), txt_GD, feats_B[2].detach()) if m.needs_feats else None
        inputs = ScoreInputs(
            s_G=g.s,
            h_G=g.h,
            feats=feats,
            rand_G=rand_G,
            history=self.source.name,
            cluster_G=cluster_G,
            noisy_G=g.noisy if m.needs_truth else None,
            gate=self.gate,
            uid_G=g.uid,
            visits=self.visits,
            rule=self.rule,
            seed=self.cfg.run.seed * 1_000_003 + step + 2**40,  # not _draws' stream
        )
        return m.score(inputs).cpu(), m.largest, cluster_G

    def after_step(self, step: int) -> None:
        """Called after every optimizer step."""
        self.source.after_step()

    def report(self, sink, step: int) -> None:
        """At log time, on every rank (only the main rank writes): histograms of s, h and the key,
        the most-rejected grid every selection.grid_every_steps, the per-sample parquet log."""
        self.reporter.write(sink, step)

    # --- state -----------------------------------------------------------------------------------

    def _parts(self) -> dict:
        """The optional parts that carry state across steps, by checkpoint key (None: not used)."""
        return {
            "balance": self.balance,
            "gate": self.gate,
            "visits": self.visits,
            "rule": self.rule,
        }

    def state_dict(self) -> dict:
        sd = {"store": None, "weights": None, **self.source.state_dict()}
        sd.update({k: p.state_dict() if p is not None else None for k, p in self._parts().items()})
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.source.load_state_dict(sd)
        for key, part in self._parts().items():
            if part is not None and sd.get(key) is not None:
                part.load_state_dict(sd[key])
