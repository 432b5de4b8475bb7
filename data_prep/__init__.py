"""Data preparation: url lists -> webdataset shards (img2dataset), the Fashion-MNIST demo,
noise injection with ground truth, and manifests.

Submodules are imported lazily by their users; importing this package is cheap and only
pins the environment img2dataset expects (no update check, no Hugging Face network calls).
"""

import os

# img2dataset imports albumentations (which phones home for updates) and, through wandb and
# friends, huggingface_hub. Both must stay offline: set these before anything imports them.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class DataPrepError(ValueError):
    """Bad user input (missing file or column, empty list, folder without shards, ...).

    The CLI prints its message as one line and exits non-zero; library callers can catch it.
    """


__all__ = ["DataPrepError"]
