"""Model throughput with and without selection, on in-memory synthetic batches.

    python -m benchmarks.throughput --model ViT-B-32 --batch 256 --ratio 0.2 --precision bf16 \
        --methods none@b,none@B,random,dissect:memory,dissect:ema --out results/throughput.json
    torchrun --nproc_per_node N -m benchmarks.throughput ...        (several GPUs / CPU ranks)

Data loading is excluded on purpose (batches are random tensors already on the device), so the
numbers isolate what selection costs and saves in the model and the collectives. Each method is
timed through the same StepRunner the trainer uses (select -> forward -> loss -> backward/step).

Methods: `none@b` trains b per rank (what selection trains), `none@B` trains the whole super-batch
B = b / r (what selection replaces), `random`, `clipscore`, `dissect:<history>`. The cost model in
docs/design.md predicts, per scored sample, time(dissect:memory) / time(none@B) = (1 + 3r) / 3 and
time(dissect:ema) / time(none@B) = (2 + 3r) / 3; the report gives measured vs predicted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import pipeline  # noqa: F401
from pipeline.config import config_from_dict
from pipeline.dist import DistInfo, init_distributed
from pipeline.model import build_model
from pipeline.trainer import StepRunner


def make_batch(
    n: int, image_size: int, ctx: int, uid0: int, device, gen, caption_len: int = 0
) -> dict:
    """Random images and tokens; ``caption_len`` > 0: SOT, that many word tokens, EOT, padding
    (what the tokenizer gives for a short caption), else every position a random token."""
    tokens = torch.randint(1, 49000, (n, ctx), generator=gen)
    if 0 < caption_len < ctx - 1:
        tokens[:, 0], tokens[:, caption_len + 1] = 49406, 49407
        tokens[:, caption_len + 2 :] = 0
    return {
        "images": torch.randn(n, 3, image_size, image_size, generator=gen).to(device),
        "tokens": tokens.to(device),
        "uid": torch.arange(uid0, uid0 + n, dtype=torch.int64),
        "label": torch.full((n,), -1, dtype=torch.int64),
        "noisy": torch.zeros(n, dtype=torch.bool),
        "captions": [""] * n,
    }


def score_overrides(setting: str, model_name: str) -> dict:
    """'pd0.5~size0.75' (benchmarks.scoring's settings, '~'-joined) -> selection.score_* keys."""
    if not setting:
        return {}
    from benchmarks.scoring import parse_setting

    opts = parse_setting(setting.replace("~", "+"), build_model(model_name).model)
    return {
        "score_patch_dropout": opts.patch_dropout,
        "score_image_size": opts.image_size,
        "score_trim_tokens": opts.trim_tokens,
        "score_lean": opts.lean,
    }


def bench_method(method: str, args: argparse.Namespace, dist: DistInfo) -> dict:
    """``method`` as in --methods, optionally ~setting[~setting] (scoring options, e.g.
    dissect:ema~pd0.5~size0.75; see benchmarks.scoring)."""
    b, r = args.batch, args.ratio
    B = int(round(b / r))
    base_method, _, setting = method.partition("~")
    sel, history = (base_method.split(":") + ["memory"])[:2]
    if sel.startswith("none"):
        train_b = B if base_method == "none@B" else b
        sel_cfg = {"method": "none"}
    else:
        train_b = b
        sel_cfg = {
            "method": sel,
            "ratio": r,
            "history": history,
            "warmup_steps": args.warmup,
            "score_chunk": args.score_chunk,
            "log_samples": False,
            **score_overrides(setting, args.model),
        }
    cfg = config_from_dict(
        {
            "run": {"seed": 0},
            "data": {"batch_size": train_b},
            "model": {"name": args.model, "trim_text": not args.no_trim_text},
            "optim": {"lr": 1e-4, "warmup_steps": 0},
            "selection": sel_cfg,
            "deepspeed": {
                "zero_stage": args.zero_stage,
                "precision": args.precision,
                "fused_adam": not args.no_fused_adam,
                "compile": args.compile,
            },
        }
    )
    loaded = cfg.super_batch_size
    W = dist.world_size
    bundle = build_model(args.model, seed=0)
    image_size = bundle.preprocess_val.transforms[0].size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    total = args.warmup + args.steps
    # uids cycle over what warm-up saw, so memory/snapshot read real stored scores afterwards
    pool = max(1, args.warmup) * W * loaded
    runner = StepRunner(cfg, dist, bundle.model, total, store_size=pool, steps_per_epoch=total)
    gen = torch.Generator().manual_seed(dist.rank)
    batches = [
        make_batch(
            loaded,
            image_size,
            bundle.context_length,
            0,
            runner.engine.device,
            gen,
            args.caption_len,
        )
        for _ in range(2)
    ]
    times, parts = [], {}
    for step in range(total):
        batch = dict(batches[step % 2])
        uid0 = (step * W + dist.rank) * loaded % pool
        batch["uid"] = torch.arange(uid0, uid0 + loaded, dtype=torch.int64)
        t0 = time.perf_counter()
        m = runner.step(batch, step, epoch=0)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            for k, v in m.items():
                if k.startswith("perf/"):
                    parts.setdefault(k, []).append(v)
    step_s = statistics.median(times)
    del runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.compile:
        # the next method's model is a new one: compile it for its own shapes, not as a
        # dynamic-shape recompile of this one's graph (CLIP.forward is the same code object)
        torch._dynamo.reset()
    return {
        "method": method,
        "train_batch": train_b,
        "loaded_batch": loaded,
        "world": W,
        "step_s": step_s,
        "scored_per_s": W * loaded / step_s,
        "trained_per_s": W * train_b / step_s,
        **{k: statistics.median(v) for k, v in parts.items()},
    }


def report(results: list[dict], ratio: float) -> str:
    base = {r["method"]: r for r in results}
    full = base.get("none@B")
    lines = [
        "| method | loaded/rank | trained/rank | step s | scored samples/s | trained samples/s | "
        "time per loaded sample vs none@B | cost model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    model = {
        "none@B": 1.0,
        "none@b": None,
        "random": ratio,
        "clipscore": (1 + 3 * ratio) / 3,
        "dissect:memory": (1 + 3 * ratio) / 3,
        "dissect:snapshot": (1 + 3 * ratio) / 3,
        "dissect:score_ema": (1 + 3 * ratio) / 3,
        "dissect:ema": (2 + 3 * ratio) / 3,
    }
    for r in results:
        rel = ""
        if full is not None:
            rel = (
                f"{(r['step_s'] / r['loaded_batch']) / (full['step_s'] / full['loaded_batch']):.3f}"
            )
        pred = model.get(r["method"].partition("~")[0])
        lines.append(
            f"| {r['method']} | {r['loaded_batch']} | {r['train_batch']} | {r['step_s']:.4f} | "
            f"{r['scored_per_s']:.0f} | {r['trained_per_s']:.0f} | {rel} | "
            f"{'' if pred is None else f'{pred:.3f}'} |"
        )
    small, big = base.get("none@b"), base.get("none@B")
    if small and big:  # small-batch efficiency: 1.0 would be a step cost proportional to b
        lines += [
            "",
            f"step(b) / step(B) = {small['step_s'] / big['step_s']:.3f} against b / B = "
            f"{small['train_batch'] / big['train_batch']:.3f}",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--batch", type=int, default=32, help="train batch b per rank")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per method (selection warm-up)"
    )
    ap.add_argument("--score-chunk", type=int, default=1024)
    ap.add_argument(
        "--caption-len",
        type=int,
        default=0,
        help="word tokens per synthetic caption (0: every position a random token)",
    )
    ap.add_argument(
        "--no-fused-adam",
        action="store_true",
        help="torch's foreach AdamW instead of its fused kernel (deepspeed.fused_adam=false)",
    )
    ap.add_argument(
        "--no-trim-text",
        action="store_true",
        help="training and eval forwards take all context_length text positions (model.trim_text="
        "false; the lean scoring path still trims, selection.score_trim_tokens)",
    )
    ap.add_argument(
        "--compile",
        default="",
        metavar="BACKEND",
        help="torch.compile the model's forward (deepspeed.compile, e.g. inductor); compiling "
        "happens in the untimed --warmup steps",
    )
    ap.add_argument("--methods", default="none@b,none@B,random,dissect:memory,dissect:ema")
    ap.add_argument("--out", default="results/throughput.json")
    args = ap.parse_args(argv)
    dist = init_distributed()
    results = []
    for method in args.methods.split(","):
        res = bench_method(method, args, dist)
        results.append(res)
        if dist.is_main:
            print(json.dumps(res), file=sys.stderr, flush=True)
            # after every method: a run cut short by a time limit keeps what it measured
            table = write_results(results, args, dist)
    if dist.is_main:
        print(table)
    return 0


def write_results(results: list[dict], args: argparse.Namespace, dist: DistInfo) -> str:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    table = report(results, args.ratio)
    out.write_text(json.dumps({"args": vars(args), "device": device, "results": results}, indent=2))
    out.with_suffix(".md").write_text(
        f"device: {device}, world {dist.world_size}, model {args.model}, "
        f"{args.precision}, ZeRO-{args.zero_stage}, b={args.batch}, "
        f"r={args.ratio}\n\n{table}\n"
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
