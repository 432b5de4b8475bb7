"""Process environment defaults, set in one place by both packages (no torch here).

Each is a default: a value already in the environment wins.

- ``NO_ALBUMENTATIONS_UPDATE``, ``HF_HUB_OFFLINE``: img2dataset and open_clip must not reach for
  the network (albumentations checks for updates at import; the hub would try to download).
- ``TOKENIZERS_PARALLELISM``: the tokenizer's thread pool must not fork inside loader workers.
- ``TORCH_EXTENSIONS_DIR``: where DeepSpeed JIT-compiles its CPU comm op. Inside the virtual
  environment (``.venv/torch_extensions``), so that one checkout's cache, or a build killed
  midway in it, can never block another checkout's runs (the default, ~/.cache/torch_extensions,
  is shared by every project of the user). Outside a virtual environment torch's default stays.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULTS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def extensions_dir() -> Path | None:
    """The project's torch extensions cache (None: torch's own default is used)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(sys.prefix) / "torch_extensions" if in_virtualenv() else None


def set_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    ext = extensions_dir()
    if ext is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ext))
