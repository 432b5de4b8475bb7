"""Data preparation: url lists -> webdataset shards (img2dataset), the Fashion-MNIST demo,
noise injection with ground truth, and manifests.

Submodules are imported lazily by their users; importing this package is cheap and only
pins the environment img2dataset expects (no update check, no Hugging Face network calls).
"""

# img2dataset imports albumentations (which phones home for updates) and, through wandb and
# friends, huggingface_hub. Both must stay offline: the defaults are set before anything
# imports them, from the one table both packages share (dissect_common imports no torch).
from dissect_common import env
from dissect_common.errors import DataPrepError

env.set_defaults()


__all__ = ["DataPrepError"]
