"""CLIP pretraining on DeepSpeed with DISSect online sample selection."""

from pipeline import _compat  # noqa: F401  (must run before torchvision/open_clip imports)
