"""Data preparation: url lists -> webdataset shards (img2dataset), the Fashion-MNIST demo,
noise injection with ground truth, and manifests.

Submodules are imported lazily by their users; importing this package is cheap and only
pins the environment img2dataset expects (no update check, no Hugging Face network calls).
"""

# img2dataset imports albumentations (which phones home for updates) and, through wandb and
# friends, huggingface_hub. Both must stay offline: the defaults are set before anything
# imports them, from the one table both packages share (pipeline._env imports no torch).
from pipeline import _env

_env.set_defaults()


class DataPrepError(ValueError):
    """Bad user input (missing file or column, empty list, folder without shards, ...).

    The CLI prints its message as one line and exits non-zero; library callers can catch it.
    """


__all__ = ["DataPrepError"]
