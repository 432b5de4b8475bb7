import os
import sys
import uuid
from pathlib import Path

# first: the environment defaults (dissect_common.env) and the torchvision compat shim, before
# anything imports open_clip, img2dataset or deepspeed
import pipeline  # noqa: F401

# Every process the suite starts inherits this marker; at the end no `pipeline.train` process
# carrying it may be alive (pytest_sessionfinish below).
SUITE_MARK = "DISSECT_TEST_SUITE"
os.environ.setdefault(SUITE_MARK, uuid.uuid4().hex)
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, saying so, where torch sees no GPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); torch sees no GPU here")
    for item in gpu:
        item.add_marker(skip)


def _suite_training_processes() -> list:
    """Live `pipeline.train` processes started by this suite (found by the inherited marker)."""
    import psutil

    mark = f"{SUITE_MARK}={os.environ[SUITE_MARK]}".encode()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid() or "pipeline.train" not in " ".join(
                proc.info["cmdline"] or []
            ):
                continue
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any training process the suite started outlives it (then kill them)."""
    import psutil

    leftovers = _suite_training_processes()
    if not leftovers:
        return
    lines = [f"  pid {p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}" for p in leftovers]
    sys.stderr.write(
        "\nFAILED: training processes started by the test suite are still alive:\n"
        + "\n".join(lines)
        + "\n(killed now)\n"
    )
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    session.exitstatus = 1
