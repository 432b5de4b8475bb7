"""open_clip models, preprocessing and tokenizer, built offline with random init.

Tiny configs under configs/models/ are registered with open_clip so `model.name=tiny-vit`
works like any built-in name (ViT-B-32, RN50, ...). Nothing is downloaded: `pretrained` is
never set here, and the BPE vocabulary ships inside the open_clip package.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

import pipeline  # noqa: F401  (torchvision compat before open_clip)
from pipeline.config import ConfigError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
_registered = False


def register_model_configs() -> None:
    global _registered
    if not _registered and MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    Here it is never news: training starts from random init by design, and evaluation and
    export load their weights right after building the model.
    """
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable  # list[str] -> LongTensor [N, context_length]
    context_length: int


def check_model_name(name: str) -> None:
    register_model_configs()
    if name not in open_clip.list_models():
        raise ConfigError(
            f"model.name {name!r} is not an open_clip model; tiny configs live in {MODEL_CONFIG_DIR} "
            f"(e.g. tiny-vit, small-vit), built-ins include ViT-B-32, RN50"
        )


def build_model(name: str, seed: int | None = None) -> ClipBundle:
    """Random-init open_clip model with its transforms and tokenizer (same init for a seed)."""
    check_model_name(name)
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_random_init():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, output_dict=False
        )
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        context_length=tokenizer.context_length,
    )


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's rule: gains, biases, norms and logit_scale get no weight decay."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(n, p) else decay).append(p)
    return [
        {"params": plain, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


# --- text at the length of its longest caption -----------------------------------------------
#
# open_clip's CLIP.encode_text adds all ``context_length`` (77) position embeddings, so it only
# takes full-length token rows, although web captions are mostly far shorter. With the causal
# mask and EOT (argmax) pooling no position up to a caption's EOT attends to the padding after
# it: cutting every row at the batch's longest caption gives the same features, and the same
# gradients (the cut positions' embeddings get zero gradient either way), for less compute.


def text_trimmable(model: torch.nn.Module) -> bool:
    """open_clip's CLIP with a causal, argmax-pooled text tower (tiny-vit, small-vit, ViT-B-32):
    the models whose text may be cut at the longest caption without changing the result."""
    return (
        isinstance(model, open_clip.model.CLIP)
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def text_features(model: torch.nn.Module, tokens_NL: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text (unnormalised) for rows of any length L <= context_length."""
    L = tokens_NL.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens_NL).to(cast) + model.positional_embedding[:L].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = text_global_pool(model.ln_final(x), tokens_NL, model.text_pool_type)
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def _encode_text_any_length(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    x = text_features(self, text)
    return F.normalize(x, dim=-1) if normalize else x


def accept_trimmed_text(model: torch.nn.Module) -> bool:
    """Let ``model.encode_text`` (and so ``model(images, tokens)``) take token rows cut short.

    Binds an instance method, so parameters, state-dict keys and checkpoints are unchanged.
    Returns False, leaving the model as it is, for models where a cut would change the result.
    """
    if not text_trimmable(model):
        return False
    model.encode_text = types.MethodType(_encode_text_any_length, model)
    return True


def last_token_lengths(tokens_NL: torch.Tensor) -> torch.Tensor:
    """[N] 1-based position of each row's last non-pad token (0 for an all-padding row)."""
    pos = torch.arange(1, tokens_NL.shape[1] + 1, device=tokens_NL.device)
    return ((tokens_NL != 0) * pos).amax(dim=1)


def trim_tokens(tokens_NL: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Rows cut after the longest caption, rounded up to ``multiple`` positions (fewer distinct
    shapes, aligned matrix sizes); a view, never longer than the rows were."""
    N, L = tokens_NL.shape
    if N == 0:
        return tokens_NL
    longest = int(last_token_lengths(tokens_NL).max())
    keep = min(L, max(multiple, -(-longest // multiple) * multiple))
    return tokens_NL[:, :keep]
