import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision compat shim before anything imports open_clip)

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _isolate_process_group_and_env():
    """A test that runs an entry point in-process (init_distributed sets RANK, MASTER_PORT, ...)
    must not leak its process group or those variables into later tests' subprocesses, where an
    inherited MASTER_PORT still held by this process fails with EADDRINUSE."""
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
