"""Evaluation: zero-shot classification and image-text retrieval.

    metrics = evaluate_val(encode, loader, tokenizer, zeroshot=(classnames, templates))

``encode(images, tokens)`` returns L2-normalised (image_feats [N, D], text_feats [N, D]); either
input may be None. It is the training engine's forward in a run (so ZeRO-3 gathers weights as
usual; every rank evaluates the same val set in lockstep) or a plain open_clip model here.

Metric names: eval/zeroshot_top1, eval/zeroshot_top5, eval/i2t_r{1,5,10}, eval/t2i_r{1,5,10}
(a second, retrieval-only set gets the prefix eval/ret_). Values are fractions in [0, 1].

CLI:  dissect-eval --checkpoint EXPORT_DIR --val data/fmnist/val [--val-retrieval DIR]
      dissect-eval --checkpoint model.pt --model tiny-vit --val data/fmnist/val
      dissect-eval --run runs/demo           (the run's model.pt and its config's val sets)
Prints one readable line; --out FILE writes the metrics as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

# --- metrics on embeddings (pure functions) ------------------------------------------------------


def topk_accuracy(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k largest logits."""
    C = logits_NC.shape[1]
    top = logits_NC.topk(min(max(ks), C), dim=1).indices
    hit = top == labels_N[:, None]
    return {k: float(hit[:, : min(k, C)].any(dim=1).float().mean()) for k in ks}


def retrieval_recall(
    img_ND: torch.Tensor,
    txt_ND: torch.Tensor,
    ks=(1, 5, 10),
    captions: list[str] | None = None,
) -> dict[str, float]:
    """Image i's true caption is text i. R@K both ways over the whole set.

    A query counts as hit when a true match is within the top K; ties are broken
    pessimistically (an equal score of a wrong item ranks ahead), so duplicates cannot inflate.
    With ``captions``, every pair whose caption text equals the query's is a true match: on a set
    whose captions repeat (class captions) "text i" is one of many identical texts, and asking
    for exactly that one measures chance, not retrieval. Unique captions give the same numbers.
    """
    sim = img_ND.float() @ txt_ND.float().T
    if captions is None:
        same = torch.eye(len(sim), dtype=torch.bool)
    else:
        ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions])
        same = cid[:, None] == cid[None, :]
    # rank of the best true match = number of wrong items scoring >= it
    i2t_best = sim.masked_fill(~same, float("-inf")).max(dim=1).values
    t2i_best = sim.masked_fill(~same, float("-inf")).max(dim=0).values
    i2t_rank = ((sim >= i2t_best[:, None]) & ~same).sum(dim=1)
    t2i_rank = ((sim >= t2i_best[None, :]) & ~same).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
    return out


# --- running a model over a val set --------------------------------------------------------------


class _TextEncoder:
    """Adapter: open_clip's classifier builder calls model.encode_text(tokens, normalize=True)."""

    def __init__(self, encode: Callable):
        self.encode = encode

    def encode_text(self, tokens, normalize=True):
        return self.encode(None, tokens)[1]


@torch.no_grad()
def embed(encode: Callable, loader: Iterable[dict]) -> dict:
    imgs, txts, labels, captions = [], [], [], []
    for batch in loader:
        f_img, f_txt = encode(batch["images"], batch["tokens"])
        imgs.append(f_img.float().cpu())
        txts.append(f_txt.float().cpu())
        labels.append(batch["label"].cpu())
        captions += batch.get("captions") or []
    if not imgs:
        raise ValueError("the val set yielded no samples")
    out = {"img": torch.cat(imgs), "txt": torch.cat(txts), "label": torch.cat(labels)}
    out["captions"] = captions if len(captions) == len(out["img"]) else None
    return out


@torch.no_grad()
def evaluate_val(
    encode: Callable,
    loader: Iterable[dict],
    tokenizer: Callable,
    zeroshot: tuple[list[str], list[str]] | None = None,
    prefix: str = "eval/",
    retrieval: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    e = embed(encode, loader)
    out: dict[str, float] = {}
    if retrieval:
        out.update(
            {
                prefix + k: v
                for k, v in retrieval_recall(e["img"], e["txt"], captions=e["captions"]).items()
            }
        )
    if zeroshot is not None:
        classnames, templates = zeroshot
        templates = [t.replace("{c}", "{}") for t in templates]
        W_DC = build_zero_shot_classifier(
            _TextEncoder(encode),
            tokenizer,
            classnames,
            templates,
            num_classes_per_batch=len(classnames),
            device=device,
        )
        labels = e["label"]
        ok = labels >= 0
        if ok.any():
            logits = e["img"][ok] @ W_DC.float().cpu()
            acc = topk_accuracy(logits, labels[ok], ks=(1, 5))
            out[prefix + "zeroshot_top1"] = acc[1]
            out[prefix + "zeroshot_top5"] = acc[5]
    out[prefix + "samples"] = float(len(e["img"]))
    return out


def model_encoder(model: torch.nn.Module, device: torch.device | str = "cpu") -> Callable:
    """encode(images, tokens) for a plain open_clip model (features normalised)."""

    def encode(images, tokens):
        img = model.encode_image(images.to(device), normalize=True) if images is not None else None
        txt = model.encode_text(tokens.to(device), normalize=True) if tokens is not None else None
        return img, txt

    return encode


def evaluate_sets(
    encode,
    tokenizer,
    preprocess,
    val: str,
    val_retrieval: str = "",
    batch_size: int = 256,
    max_samples: int = 0,
    device="cpu",
) -> dict:
    """Evaluate on the configured val sets: zero-shot (when classnames exist) + retrieval."""
    from pipeline.data import expand_shards, make_eval_loader, zeroshot_meta

    out: dict[str, float] = {}
    if val:
        loader = make_eval_loader(
            expand_shards(val), preprocess, tokenizer, batch_size, max_samples
        )
        out.update(evaluate_val(encode, loader, tokenizer, zeroshot_meta(val), device=device))
    if val_retrieval:
        loader = make_eval_loader(
            expand_shards(val_retrieval), preprocess, tokenizer, batch_size, max_samples
        )
        out.update(evaluate_val(encode, loader, tokenizer, None, prefix="eval/ret_", device=device))
    return out


# --- CLI -------------------------------------------------------------------------------------------


def describe(metrics: dict) -> str:
    """One readable line: 'zero-shot top-1 0.512 top-5 0.931 | i2t R@1/5/10 ... | t2i ...'."""
    parts = []
    for prefix, what in (("eval/", ""), ("eval/ret_", "retrieval set: ")):
        if prefix + "zeroshot_top1" in metrics:
            parts.append(
                f"{what}zero-shot top-1 {metrics[prefix + 'zeroshot_top1']:.3f} "
                f"top-5 {metrics[prefix + 'zeroshot_top5']:.3f}"
            )
        for d in ("i2t", "t2i"):
            if f"{prefix}{d}_r1" in metrics:
                rs = "/".join(f"{metrics[f'{prefix}{d}_r{k}']:.3f}" for k in (1, 5, 10))
                parts.append(f"{what}{d} R@1/5/10 {rs}")
    n = metrics.get("eval/samples")
    return " | ".join(parts) + (f" ({int(n)} samples)" if n else "")


def run(args) -> int:
    """dissect-eval after its arguments are parsed (pipeline.cmd_eval); see the module docstring."""
    from pipeline.config import ConfigError, load_config
    from pipeline.model import build_model

    try:
        val, val_ret, name, ckpt = args.val, args.val_retrieval, args.model, args.checkpoint
        if args.run:
            cfg = load_config(Path(args.run) / "config.yaml")
            name = name or cfg.model.name
            ckpt = ckpt or str(Path(args.run) / "model.pt")
            val = val or cfg.data.val
            val_ret = val_ret or cfg.data.val_retrieval
        if ckpt and Path(ckpt).is_dir():  # a dissect-export folder: its config names the model
            conf = Path(ckpt) / "open_clip_config.json"
            if not conf.is_file():
                raise ConfigError(
                    f"{ckpt} is a folder without open_clip_config.json: not an export"
                )
            name, ckpt = (
                name or f"local-dir:{ckpt}",
                str(Path(ckpt) / "open_clip_pytorch_model.bin"),
            )
        if not (name and ckpt):
            raise ConfigError("give --run RUN_DIR, or --checkpoint FILE with --model NAME")
        if not Path(ckpt).is_file():
            raise ConfigError(
                f"checkpoint {ckpt!r} does not exist (dissect-export RUN_DIR writes one)"
            )
        if not (val or val_ret):
            raise ConfigError("no val set: pass --val and/or --val-retrieval")
        bundle = build_model(name)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        bundle.model.load_state_dict(state)
        bundle.model.eval()
        metrics = evaluate_sets(
            model_encoder(bundle.model),
            bundle.tokenizer,
            bundle.preprocess_val,
            val,
            val_ret,
            args.batch_size,
            args.max_samples,
        )
    except (ConfigError, FileNotFoundError) as err:
        print(f"dissect-eval: error: {err}", file=sys.stderr)
        return 2
    print(describe(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
