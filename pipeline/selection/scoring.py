"""The scoring forward: no-grad features of a super-batch, chunked, current or historical weights.

Shapes: N rows scored on this rank, D feature dim, c = selection.score_chunk rows per forward,
L text context length, P image patches (grid * grid), p kept patches.

    scorer = Scorer(engine, chunk=512, precision="fp32", options=ScoreOptions(...))
    scorer.seed = step                                     # patch-dropout draws (per step)
    img_ND, txt_ND, scale = scorer.features(images, tokens)
    s_N = scorer.historical_s(batch, rows_N, weights)      # correlation under other weights
    scorer.take_seconds()                                  # forward time since the last call

Every forward runs under no_grad. ``forward_s`` accumulates the time spent in forwards (device
synchronised), so the selector can report scoring time apart from bookkeeping even when a
historical forward happens in the middle of selection (the snapshot memo).

Cheaper scoring (ScoreOptions; the training forward is never touched). When the engine's module
is open_clip's CLIP with its own VisionTransformer and ZeRO stage < 3, scoring calls the towers
directly (``lean_features``) instead of going through the DeepSpeed engine:

- inference mode, and no host sync inside the chunk loop (one per call, for token lengths);
- text tokens trimmed to the longest caption of the chunk: with the causal mask and EOT
  (argmax) pooling no position before EOT attends to the padding, so this is exact;
- ``patch_dropout`` (FLIP): each image keeps a random (1 - p) share of its patches, drawn from
  a private generator seeded by (seed, call), so the global RNG is never advanced;
- ``image_size``: images resized (bilinear, antialiased) and the position embeddings
  interpolated (bicubic) to the smaller grid.

Under ZeRO-3 the parameters are only gathered inside module forwards, so the towers cannot be
called piecewise: scoring goes through the engine and the two approximate options are refused.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.collectives import all_reduce_max
from pipeline.config import ConfigError
from pipeline.model import last_token_lengths, text_features, text_trimmable
from pipeline.selection.methods import correlation

if TYPE_CHECKING:  # typing only: importing the engine imports deepspeed
    from pipeline.engine import Engine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class ScoreOptions:
    """How the scoring forward may differ from the training forward (selection.score_*)."""

    patch_dropout: float = 0.0  # share of image patches dropped per image
    image_size: int = 0  # score at this resolution; 0: the model's
    trim_tokens: bool = True  # text tokens cut at the chunk's longest caption (exact)
    lean: bool = True  # the direct tower path (inference mode, no per-chunk syncs)

    @property
    def approximate(self) -> bool:
        return self.patch_dropout > 0 or self.image_size > 0


def lean_supported(module: torch.nn.Module) -> bool:
    """Whether ``lean_features`` can run this module: open_clip CLIP with a ViT image tower and
    an argmax-pooled causal text tower (what tiny-vit, small-vit and ViT-B-32 are)."""
    from open_clip.transformer import VisionTransformer

    v = getattr(module, "visual", None)
    return (
        text_trimmable(module)
        and isinstance(v, VisionTransformer)
        and getattr(v, "attn_pool", None) is None
    )


def interpolate_pos(pos_TD: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
    """ViT position embeddings [1 + grid^2, D] -> [1 + new_grid^2, D] (class token kept)."""
    if new_grid == grid:
        return pos_TD
    cls, patches = pos_TD[:1], pos_TD[1:]
    D = patches.shape[1]
    g = patches.reshape(1, grid, grid, D).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, g.permute(0, 2, 3, 1).reshape(-1, D).to(pos_TD.dtype)])


def encode_image(
    visual, images: torch.Tensor, opts: ScoreOptions, gen: torch.Generator | None
) -> torch.Tensor:
    """open_clip VisionTransformer.forward with the scoring options (unnormalised features)."""
    if opts.image_size and opts.image_size != images.shape[-1]:
        size = (opts.image_size, opts.image_size)
        images = F.interpolate(
            images, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    x = visual.conv1(images)  # [N, width, g, g]
    N, width, g, _ = x.shape
    x = x.reshape(N, width, g * g).permute(0, 2, 1)  # [N, P, width]
    pos = visual.positional_embedding
    pos = interpolate_pos(pos, int(math.isqrt(pos.shape[0] - 1)), g).to(x.dtype)
    x = x + pos[1:]
    if opts.patch_dropout > 0:
        keep = max(1, int(round(g * g * (1.0 - opts.patch_dropout))))
        idx_Np = torch.rand(N, g * g, generator=gen, device=x.device).topk(keep, dim=1).indices
        x = torch.gather(x, 1, idx_Np.unsqueeze(-1).expand(-1, -1, width))
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(N, 1, width)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def chunk_lengths(tokens_NL: torch.Tensor, chunk: int, trim: bool) -> list[int]:
    """Text length per chunk: through the last non-pad token of its longest row (one host sync)."""
    N, L = tokens_NL.shape
    n = max(1, (N + chunk - 1) // chunk)
    if not trim or N == 0:
        return [L] * n
    last_N = last_token_lengths(tokens_NL)
    pad = n * chunk - N
    last_N = F.pad(last_N, (0, pad))
    return last_N.reshape(n, chunk).amax(dim=1).clamp(min=1).tolist()


class Scorer:
    def __init__(
        self, engine: Engine, chunk: int, precision: str, options: ScoreOptions | None = None
    ):
        self.engine = engine
        self.chunk = chunk
        self.precision = precision
        self.options = options or ScoreOptions()
        self.forward_s = 0.0
        self.seed = 0  # patch-dropout draws: the selector sets the step here
        zero3 = getattr(engine, "zero_stage", 0) == 3
        supported = lean_supported(getattr(engine, "module", None))
        if self.options.approximate and (zero3 or not supported):
            why = "under ZeRO-3" if zero3 else "for this model"
            raise ConfigError(
                "selection.score_patch_dropout / selection.score_image_size are not available "
                f"{why}: they need open_clip's CLIP with a ViT image tower and ZeRO stage 0-2"
            )
        self.lean = self.options.lean and supported and not zero3

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
        if self.lean:
            with torch.inference_mode():
                img, txt, scale = self._lean(images, tokens)
            # plain tensors again: inference tensors refuse in-place use outside inference mode
            img, txt, scale = img.clone(), txt.clone(), scale.clone()
        else:
            img, txt, scale = self._engine(images, tokens, n_chunks, pad)
        sync(self.engine.device)
        self.forward_s += time.perf_counter() - t0
        return img, txt, scale

    def _engine(self, images, tokens, n_chunks, pad):
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
        return img, txt, scale

    def _lean(self, images, tokens):
        """The towers called directly, chunk by chunk (no lockstep: ZeRO 0-2 has no collectives
        in a forward, so ranks may run different chunk counts)."""
        eng, opts, c = self.engine, self.options, self.chunk
        model = eng.module
        dev = eng.device
        N = images.shape[0]
        images = images.to(dev, eng.dtype, non_blocking=True)
        tokens = tokens.to(dev, non_blocking=True)
        lengths = chunk_lengths(tokens, c, opts.trim_tokens)
        gen = None
        if opts.patch_dropout > 0:
            gen = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + 7919)
        imgs, txts = [], []
        with self._autocast():
            for i, length in zip(range(0, N, c), lengths):
                f_img = encode_image(model.visual, images[i : i + c], opts, gen)
                f_txt = text_features(model, tokens[i : i + c, :length])
                imgs.append(F.normalize(f_img.float(), dim=-1))
                txts.append(F.normalize(f_txt.float(), dim=-1))
        D = imgs[0].shape[1] if imgs else model.visual.output_dim
        img = torch.cat(imgs) if imgs else torch.empty(0, D, device=dev)
        txt = torch.cat(txts) if txts else torch.empty(0, D, device=dev)
        return img, txt, model.logit_scale.exp()

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
