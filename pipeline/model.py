"""open_clip models, preprocessing and tokenizer, built offline with random init.

Tiny configs under configs/models/ are registered with open_clip so `model.name=tiny-vit`
works like any built-in name (ViT-B-32, RN50, ...). Nothing is downloaded: `pretrained` is
never set here, and the BPE vocabulary ships inside the open_clip package.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

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
