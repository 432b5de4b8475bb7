"""How well each rule's noise evidence picks the noisy pairs, offline, on finished runs' models.

    python -m benchmarks.ranking --runs results/memorising/runs/gsc_null-clusters/s* \\
        --batches 12 --out ranking.md

For each run: its final model (model.pt) and config, and its training shards cut in super-batches
of G = batch_size / ratio rows, in shard order, with no training. Per super-batch and per rule's
evidence (exactly what the rule computes, `MixtureRule.evidence`), the share of noisy rows among
the n rows of most evidence, n the super-batch's true noisy count ("precision at the true count":
what dropping by rank drops when the count is right), and the evidence's AUC against the noisy
flags; beside them what the mixture's soft draw (Gumbel top-k on P(clean), `soft_tiers`) drops
at the same count, what swap_lfdr's draw drops (its local false discovery rate, the true share as
pi0), and the swap null's share estimate of each super-batch alone (unpooled) against the true
share. The noisy flags are ground truth: benchmarks only, as the oracle is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

EVIDENCE = {"loss": "filter_soft", "gsc": "gsc_null", "swap_rank": "swap_null"}


def auc(score_G: torch.Tensor, noisy_G: torch.Tensor) -> float:
    """P(a noisy row scores above a clean one), ties half; nan without both kinds."""
    pos, neg = score_G[noisy_G].double(), score_G[~noisy_G].double()
    if not len(pos) or not len(neg):
        return float("nan")
    d = pos[:, None] - neg[None]
    return float((d > 0).double().mean() + 0.5 * (d == 0).double().mean())


def precision_at(dropped_G: torch.Tensor, noisy_G: torch.Tensor) -> float:
    return float(noisy_G[dropped_G].double().mean()) if bool(dropped_G.any()) else float("nan")


def score_batch(rules: dict, feats, noisy_G: torch.Tensor, seed: int, gamma: float) -> dict:
    """{name: value} of one super-batch: precision at the true count and AUC per evidence, the
    soft draw's precision on gsc's evidence, swap_lfdr's draw's, the unpooled swap-null share and
    the true share."""
    from pipeline.selection.methods import ScoreInputs
    from pipeline.selection.rules import (
        SwapNullShare,
        fit_gmm,
        mixture_noisy,
        null_posterior,
        posterior_tiers,
        rank_tiers,
        soft_tiers,
    )

    G = len(noisy_G)
    share = float(noisy_G.double().mean())
    x = ScoreInputs(feats=feats, uid_G=torch.arange(G), seed=seed)
    out = {"true_share": share}
    u = torch.rand(G, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for name, rule in rules.items():
        ev_GF, _, _, swap_G = rule.evidence(x)
        ev_G = ev_GF.sum(1)
        out[f"{name}_prec"] = precision_at(rank_tiers(ev_G, share), noisy_G)
        out[f"{name}_auc"] = auc(ev_G, noisy_G)
        if name == "gsc":
            clean = 1 - mixture_noisy(fit_gmm(ev_GF, 2), ev_GF)
            out["gsc_soft_prec"] = precision_at(soft_tiers(clean, share, gamma, u), noisy_G)
        if name == "swap_rank":  # swap_lfdr's draw, at the true share as the rank's count
            lfdr = posterior_tiers(null_posterior(swap_G, share), share, ev_G, u)
            out["swap_lfdr_prec"] = precision_at(lfdr, noisy_G)
        if swap_G is not None:  # one super-batch alone: no pooling over steps
            out["null_share"] = SwapNullShare(0.0).observe(swap_G)
    return out


COLUMNS = [
    ("true_share", "true noisy share"),
    ("null_share", "swap-null share (one batch)"),
    ("loss_prec", "loss: prec"),
    ("loss_auc", "loss: AUC"),
    ("gsc_soft_prec", "gsc soft draw: prec"),
    ("gsc_prec", "gsc rank: prec"),
    ("gsc_auc", "gsc: AUC"),
    ("swap_rank_prec", "swap_rank rank: prec"),
    ("swap_lfdr_prec", "swap_rank lfdr draw: prec"),
    ("swap_rank_auc", "swap_rank: AUC"),
]


@torch.no_grad()
def probe_run(run: Path, batches: int) -> dict:
    """The mean over ``batches`` super-batches of ``score_batch`` on one run's final model."""
    from pipeline.config import load_config
    from pipeline.data import expand_shards, make_eval_loader
    from pipeline.model import build_model
    from pipeline.selection.rules import make_rule

    for need in ("config.yaml", "model.pt"):
        if not (run / need).is_file():
            raise SystemExit(f"benchmarks.ranking: {run} has no {need} (not a finished run)")
    cfg = load_config(run / "config.yaml")
    bundle = build_model(cfg.model.name)
    bundle.model.load_state_dict(
        torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    )
    bundle.model.eval()
    G = int(round(cfg.data.batch_size / cfg.selection.ratio))
    loader = make_eval_loader(
        expand_shards(cfg.data.train), bundle.preprocess_val, bundle.tokenizer, G, G * batches
    )
    rules = {name: make_rule(rule, cfg.selection, 1, 0, 1) for name, rule in EVIDENCE.items()}
    rows = []
    for i, batch in enumerate(loader):
        if "noisy" not in batch or len(batch["noisy"]) < G:
            break
        m = bundle.model
        img = m.encode_image(batch["images"], normalize=True)
        txt = m.encode_text(batch["tokens"], normalize=True)
        noisy = batch["noisy"].bool()
        rows.append(
            score_batch(rules, (img, txt, m.logit_scale.exp()), noisy, i, cfg.selection.soft_gamma)
        )
        print(f"[ranking] {run}: super-batch {i + 1}/{batches}", file=sys.stderr, flush=True)
    if not rows:
        raise SystemExit(f"benchmarks.ranking: {run}'s training shards gave no full super-batch")
    mean = {
        k: sum(r[k] for r in rows if r[k] == r[k]) / max(1, sum(r[k] == r[k] for r in rows))
        for k in rows[0]
    }
    return {"run": str(run), "G": G, "batches": len(rows), **mean}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished run directories")
    ap.add_argument("--batches", type=int, default=12, help="super-batches per run")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches must be at least 1")
    results = [probe_run(Path(r), args.batches) for r in args.runs]
    head = "| run | G | batches | " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for r in results:
        cells = [f"{r.get(k, float('nan')):.3f}" for k, _ in COLUMNS]
        lines.append(f"| {r['run']} | {r['G']} | {r['batches']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(
            "`python -m benchmarks.ranking " + " ".join(argv or sys.argv[1:]) + "`\n\n" + text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
