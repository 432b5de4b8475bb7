"""What cheaper scoring costs in selection quality, and what it saves in the scoring forward.

    python -m benchmarks.scoring --data data/fmnist-q/train --model tiny-vit \
        --settings engine,lean,full,pd0.25,pd0.5,size0.75,size0.5 --out results/scoring
    python -m benchmarks.scoring --cost-only --cost-models ViT-B-32 --device cuda ...   (GPU)

Quality (``--data``, shards with ``noisy`` flags): the benchmark trains the model itself (plain
torch, AdamW + open_clip's ClipLoss, no selection) for ``--train-steps`` and keeps a copy of the
weights at ``--early-step`` (the history: what the memory store or a snapshot would hold). On
``--eval-batches`` held-out super-batches of ``--super`` rows it scores with every setting and
compares with the reference (the engine forward, what selection did before these options):

    spearman_s       rank correlation of the current-model scores s with the reference s
    overlap_clip     |kept ∩ kept_ref| / k for top-k s (clipscore), k = ratio * super
    overlap_dissect  the same for the DISSect key h - s (h: early weights, same setting)
    auc_s, auc_dissect  noise AUC of each key (clean ranked ahead of noisy; 0.5 = chance)

Cost (``--cost-models``): seconds of the scoring forward per sample, each setting against the
engine forward, on random-init models and random inputs (the forward's cost does not depend
on the weights), median of ``--reps`` passes over ``--cost-batch`` rows.

Settings, joined with '+': engine (the DeepSpeed-style module call: no trim, no inference mode),
lean (direct towers, inference mode, untrimmed text), full (lean + trimmed text: the default),
pdP (patch dropout P), sizeF (image size F x the model's, rounded to whole patches).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import pipeline  # noqa: F401
from benchmarks import markdown_table
from pipeline.data import expand_shards
from pipeline.data.loader import EpochPlan, StreamSpec, make_eval_loader, make_loader
from pipeline.model import build_model
from pipeline.selection.diagnostics import noise_auc
from pipeline.selection.methods import correlation
from pipeline.selection.scoring import ScoreOptions, Scorer


class ModuleEngine:
    """What Scorer needs of pipeline.engine.Engine (ZeRO-0 semantics: the module is called)."""

    def __init__(self, module, device, dtype=torch.float32):
        self.module, self.device, self.dtype, self.zero_stage = module, device, dtype, 0

    def forward(self, images, tokens):
        images = images.to(self.device, self.dtype, non_blocking=True)
        return self.module(images, tokens.to(self.device, non_blocking=True))


def parse_setting(setting: str, model) -> ScoreOptions:
    v = model.visual
    size, patch = v.image_size[0], v.patch_size[0]
    kw: dict = {}
    for part in setting.split("+"):
        if part == "engine":
            kw.update(lean=False, trim_tokens=False)
        elif part == "lean":
            kw.update(lean=True, trim_tokens=False)
        elif part == "full":
            kw.update(lean=True, trim_tokens=True)
        elif part.startswith("pd"):
            kw["patch_dropout"] = float(part[2:])
        elif part.startswith("size"):
            grid = max(1, round(float(part[4:]) * size / patch))
            kw["image_size"] = grid * patch
        else:
            raise SystemExit(f"unknown setting part {part!r} in {setting!r}")
    return ScoreOptions(**kw)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def topk_set(key: torch.Tensor, k: int) -> set:
    return set(torch.topk(key, k).indices.tolist())


def train(bundle, urls, args, device) -> tuple[dict, dict]:
    """Plain CLIP training without selection -> (early state_dict, final state_dict)."""
    from open_clip import ClipLoss

    model = bundle.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    loss_fn = ClipLoss()
    spec = StreamSpec(urls, args.batch, bundle.preprocess_train, bundle.tokenizer, seed=0)
    early, step, epoch = None, 0, 0
    t0 = time.time()
    while step < args.train_steps:
        for batch in make_loader(spec, EpochPlan(epoch=epoch, steps=1 << 30)):
            if step == args.early_step:
                early = copy.deepcopy(model.state_dict())
            img, txt, scale = model(batch["images"].to(device), batch["tokens"].to(device))
            loss = loss_fn(img, txt, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"[scoring] train step {step} loss {loss.item():.3f}", file=sys.stderr)
            if step >= args.train_steps:
                break
        epoch += 1
    print(f"[scoring] trained {step} steps in {time.time() - t0:.0f}s", file=sys.stderr)
    return early, copy.deepcopy(model.state_dict())


def score_all(model, state, batches, opts, device, chunk, seed0) -> torch.Tensor:
    model.load_state_dict(state)
    sc = Scorer(ModuleEngine(model.eval(), device), chunk, "fp32", opts)
    out = []
    for i, b in enumerate(batches):
        sc.seed = seed0 + i
        img, txt, _ = sc.features(b["images"], b["tokens"])
        out.append(correlation(img, txt).cpu())
    return torch.cat(out)


def quality(args, settings, device) -> list[dict]:
    bundle = build_model(args.model, seed=0)
    urls = expand_shards(args.data)
    n_eval = max(1, len(urls) // 10)  # the last shards are held out of training
    early, final = train(bundle, urls[:-n_eval], args, device)
    loader = make_eval_loader(urls[-n_eval:], bundle.preprocess_val, bundle.tokenizer, args.super)
    batches = [b for b, _ in zip(loader, range(args.eval_batches)) if len(b["uid"]) == args.super]
    noisy = torch.cat([b["noisy"] for b in batches])
    print(
        f"[scoring] {len(batches)} super-batches of {args.super}, noisy {float(noisy.float().mean()):.2f}",
        file=sys.stderr,
    )
    model = bundle.model
    k = int(round(args.ratio * args.super))
    ref = None
    rows = []
    for setting in settings:
        opts = parse_setting(setting, model)
        s = score_all(model, final, batches, opts, device, args.chunk, 100)
        h = score_all(model, early, batches, opts, device, args.chunk, 100)
        d = h - s
        if ref is None:
            ref = (s, d)
        per = [slice(i * args.super, (i + 1) * args.super) for i in range(len(batches))]
        ov_clip = statistics.mean(len(topk_set(s[p], k) & topk_set(ref[0][p], k)) / k for p in per)
        ov_dis = statistics.mean(len(topk_set(d[p], k) & topk_set(ref[1][p], k)) / k for p in per)
        rows.append(
            {
                "setting": setting,
                "image_size": opts.image_size or model.visual.image_size[0],
                "spearman_s": spearman(s, ref[0]),
                "spearman_dissect": spearman(d, ref[1]),
                "overlap_clip": ov_clip,
                "overlap_dissect": ov_dis,
                "auc_s": statistics.mean(noise_auc(s[p], noisy[p], True) for p in per),
                "auc_dissect": statistics.mean(noise_auc(d[p], noisy[p], True) for p in per),
            }
        )
        print(f"[scoring] {rows[-1]}", file=sys.stderr)
    return rows


def cost(args, settings, device) -> list[dict]:
    rows = []
    for name in args.cost_models.split(","):
        bundle = build_model(name, seed=0)
        model = bundle.model.to(device).eval()
        size = model.visual.image_size[0]
        gen = torch.Generator().manual_seed(0)
        n = args.cost_batch
        images = torch.randn(n, 3, size, size, generator=gen).to(device)
        # realistic captions: short class-template text, as in the benchmarks' data
        words = ["a photo of a sneaker", "an ankle boot on white", "a pullover, a kind of top"]
        tokens = bundle.tokenizer([words[i % len(words)] for i in range(n)]).to(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cuda":
            model = model.to(dtype)
        base = None
        for setting in settings:
            opts = parse_setting(setting, model)
            sc = Scorer(ModuleEngine(model, device, dtype), args.chunk, "fp32", opts)
            sc.features(images, tokens)  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                sc.features(images, tokens)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = med if base is None else base
            rows.append(
                {
                    "model": name,
                    "setting": setting,
                    "image_size": opts.image_size or size,
                    "ms_per_sample": 1000 * med / n,
                    "cost_vs_first": med / base,
                }
            )
            print(f"[scoring] {rows[-1]}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="train shards with noisy flags (quality part)")
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--settings", default="engine,lean,full,pd0.25,pd0.5,size0.75,size0.5")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--early-step", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--super", type=int, default=320)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--cost-models", default="tiny-vit,small-vit,ViT-B-32")
    ap.add_argument("--cost-batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    settings = args.settings.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m benchmarks.scoring " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M")
    report = {"cmd": cmd, "started": started, "device": str(device)}
    text = [f"`{cmd}` — started {started}, device {device}"]
    if not args.cost_only:
        if not args.data:
            raise SystemExit("--data is required unless --cost-only")
        q = quality(args, settings, device)
        report["quality"] = q
        cols = ["setting", "image_size", "spearman_s", "spearman_dissect", "overlap_clip"]
        cols += ["overlap_dissect", "auc_s", "auc_dissect"]
        text += [
            "",
            f"Quality ({args.model}, reference = {settings[0]}):",
            "",
            markdown_table(q, cols, float_fmt=".3f"),
        ]
    c = cost(args, settings, device)
    report["cost"] = c
    cols = ["model", "setting", "image_size", "ms_per_sample", "cost_vs_first"]
    text += [
        "",
        f"Scoring-forward cost (reference = {settings[0]}):",
        "",
        markdown_table(c, cols, float_fmt=".3f"),
    ]
    (out / "scoring.json").write_text(json.dumps(report, indent=2))
    (out / "scoring.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
