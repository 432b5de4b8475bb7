"""The DeepSpeed engine: the only module that imports deepspeed.

Builds the DeepSpeed config from the run config (batch sizes, ZeRO stage, precision, clipping,
AdamW with open_clip's no-decay groups, warmup + cosine), wraps an open_clip model, and exposes
what the trainer and the selection need: a forward returning normalised features, a train step,
checkpoint save/load, and per-rank views of the parameters ("partitions") that a historical
model (snapshot / EMA) mirrors without gathering full weights under ZeRO-3.

Also here, because they are DeepSpeed too: `build_ops` (the JIT-compiled CPU comm op, built
once at set-up and guarded against stale build locks) and `read_zero_checkpoint` (the fp32
weights of a ZeRO checkpoint without an engine or a process group, for `pipeline.export`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

from pipeline import _env
from pipeline.config import Config, ConfigError
from pipeline.model import accept_trimmed_text, param_groups, trim_tokens

_env.set_accelerator(torch.cuda.is_available())
import deepspeed  # noqa: E402
from deepspeed.utils import logger as _ds_logger  # noqa: E402

_ds_logger.setLevel(logging.WARNING)


class _DropSelfInflictedWarnings(logging.Filter):
    """DeepSpeed warnings about its own doings, not the user's: it reads the lr once while
    building the engine, before the scheduler's first step ("Attempting to get learning rate
    ... before it has started"); loading a universal checkpoint without tensor parallelism it
    says so, once per rank ("MPU is not provided, setting tp size to 1")."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "before it has started" not in msg and "MPU is not provided" not in msg


_ds_logger.addFilter(_DropSelfInflictedWarnings())

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ds_config(cfg: Config, total_steps: int) -> dict:
    o, d = cfg.optim, cfg.deepspeed
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    conf: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": d.torch_adam,
                # one fused kernel for every parameter instead of a loop of small ones: the
                # optimizer step does not shrink with the batch, so it weighs most at small b
                **({"fused": True} if d.torch_adam and d.fused_adam else {}),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                # DeepSpeed needs >= 1 warm-up step; with none asked for, start at full lr
                "warmup_num_steps": max(warmup, 1),
                "warmup_min_ratio": 0.0 if warmup > 0 else 1.0,
                "cos_min_ratio": 0.0,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": d.zero_stage},
    }
    if o.grad_clip > 0 and d.zero_stage > 0:
        # ZeRO 0 clips in Engine.backward_step: DeepSpeed's stage-0 clip_grad_norm_ fails on
        # CLIP's 0-dim logit_scale ("output with shape [] doesn't match the broadcast shape [1]").
        conf["gradient_clipping"] = o.grad_clip
    else:
        conf["gradient_clipping"] = 0.0  # DeepSpeed's default is 1.0
    if d.zero_stage == 3:
        # Every parameter is partitioned (none kept whole on each rank), and none is held
        # gathered between forwards: the historical model swaps partitions in and out.
        conf["zero_optimization"].update(
            stage3_param_persistence_threshold=0,
            stage3_max_reuse_distance=0,
            stage3_prefetch_bucket_size=0,
        )
    if d.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return conf


# --- JIT-compiled ops ----------------------------------------------------------------------------
# On CPU, DeepSpeed's comm backend loads a shared-memory op ("deepspeed_shm_comm") that torch
# JIT-compiles into TORCH_EXTENSIONS_DIR the first time (about a minute on 2 cores). torch
# guards that build with a `lock` file it creates, holds open while compiling, and deletes after;
# a build killed midway leaves the file behind and every later start waits on it forever.
# `build_ops` serialises our builds with an flock (released by the kernel however its holder
# dies), clears a `lock` that no live process holds open, then builds or loads the op.

SHM_OP = "ShareMemCommBuilder"


def _held_open(path: Path) -> bool:
    """Whether any live process has ``path`` open (torch's builder keeps its lock file open)."""
    target = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == target:
                    return True
        except OSError:  # the process ended, or is not ours to look at
            continue
    return False


def clear_stale_locks(ext_dir: Path) -> list[Path]:
    """Delete build locks under ``ext_dir`` that no live build holds; returns what was removed."""
    removed = []
    for lock in ext_dir.glob("*/lock"):
        if not _held_open(lock):
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(
                f"dissect: warning: removed a stale torch extensions build lock {lock} "
                "(left by a build that was killed)",
                file=sys.stderr,
                flush=True,
            )
    return removed


def locked_build(ext_dir: Path, name: str, load, announce: bool = True):
    """Run ``load()`` (build or load op ``name``) holding the cache's flock; see above."""
    ext_dir.mkdir(parents=True, exist_ok=True)
    with open(ext_dir / ".dissect-build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another of our processes building: wait for it
        clear_stale_locks(ext_dir)
        if announce and not any((ext_dir / name).glob("*.so")):
            print(
                f"building DeepSpeed's CPU comm op once, about a minute (cache: {ext_dir})",
                file=sys.stderr,
                flush=True,
            )
        return load()


def build_ops() -> None:
    """Build (or load) what DeepSpeed JIT-compiles for this machine; a no-op off CPU.

    `make setup` calls it once, outside any timeout; every training start calls it again before
    DeepSpeed initialises (then it only loads the built op, and clears a stale lock if any).
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder(SHM_OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    from torch.utils.cpp_extension import _get_build_directory

    ext_dir = Path(_get_build_directory(builder.name, verbose=False)).parent
    with contextlib.redirect_stdout(io.StringIO()):  # the build's chatter; errors still raise
        locked_build(ext_dir, builder.name, lambda: builder.load(verbose=False))


def check_compile_backend(backend: str) -> None:
    if not backend:
        return
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        common = ", ".join(torch._dynamo.list_backends())  # without debug/experimental ones
        raise ConfigError(
            f"deepspeed.compile: {backend!r} is not a torch.compile backend here; "
            f"one of {common} (or empty: no compile)"
        )


class Engine:
    """A DeepSpeed engine around an open_clip model."""

    def __init__(self, cfg: Config, model: torch.nn.Module, total_steps: int):
        check_compile_backend(cfg.deepspeed.compile)
        build_ops()
        self.cfg = cfg
        # before DeepSpeed wraps it: the model's own forward then takes shorter token rows
        self.trim_text = cfg.model.trim_text and accept_trimmed_text(model)
        self.ds_config = ds_config(cfg, total_steps)
        groups = param_groups(model, cfg.optim.weight_decay)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            _ds_logger.setLevel(logging.ERROR)  # each warning once per job: rank 0 prints it
        # stdout: DeepSpeed prints "... shm_comm_op built successfully" from every rank
        with contextlib.redirect_stdout(io.StringIO()):
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=groups, config=self.ds_config
            )
        self.zero_stage = cfg.deepspeed.zero_stage
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.device = self.ds.device
        if cfg.deepspeed.compile:
            # torch.compile of the module's forward, through DeepSpeed (which keeps its hooks).
            # Trimmed text gives a few sequence lengths: dynamo marks a dimension dynamic at its
            # first recompile, so they cost one more compile, not one per length.
            self.ds.compile(backend=cfg.deepspeed.compile)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None):
        """-> (image_feats [N, D], text_feats [N, D], logit_scale []), features L2-normalised.

        Either input may be None (open_clip then returns None for that side), e.g. text-only
        batches when building a zero-shot classifier; under ZeRO-3 this still goes through the
        root module, so its own parameters (text_projection, logit_scale) are gathered. Token
        rows are cut at the batch's longest caption when the model allows it (model.trim_text).
        """
        if images is not None:
            images = images.to(self.device, self.dtype, non_blocking=True)
        if tokens is not None:
            if self.trim_text:  # on the host when the batch is there: no device sync
                tokens = trim_tokens(tokens)
            tokens = tokens.to(self.device, non_blocking=True)
        return self.ds(images, tokens)

    def backward_step(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # gradients are averaged over ranks here (ZeRO 0)
        if self.zero_stage == 0 and self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.ds.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    # --- checkpoints --------------------------------------------------------------------------

    def save(self, ckpt_dir: str | Path, tag: str, client_state: dict) -> None:
        """Every rank must call this: ZeRO writes each rank's optimizer/param partitions."""
        self.ds.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False
        )

    def load(self, ckpt_dir: str | Path, tag: str, universal: bool = False) -> dict:
        """``universal``: ``ckpt_dir/tag`` is a universal checkpoint (see `to_universal`), which
        loads on any world size. DeepSpeed reads that switch from its config only while loading,
        so it is set for this call rather than in the run's ds_config."""
        self.ds._config.load_universal_checkpoint = universal
        try:
            path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {ckpt_dir}")
        return client_state

    def to_universal(self, step_dir: Path, out: Path) -> None:
        """DeepSpeed's ds_to_universal: the step's ZeRO partitions -> per-parameter fp32 weights
        and optimizer moments under ``out``, loadable on any world size. In this process, one
        worker (no process pool); its progress chatter goes nowhere.

        Our checkpoints carry no UNIVERSAL_CHECKPOINT_INFO (it holds tensor/pipeline-parallel
        merge rules; data parallel alone needs none), so it is supplied where DeepSpeed injects
        missing state, with one rule: 0-dim parameters (CLIP's logit_scale) are "replicated",
        i.e. taken as they are. The default merge concatenates slices, which a 0-dim tensor
        cannot be (RuntimeError "zero-dimensional tensor ... cannot be concatenated"). A ZeRO-0
        bf16/fp16 or ZeRO 1-3 checkpoint converts; a checkpoint of another model fails here or
        in `load` (shapes), and the caller turns that into one line.
        """
        from argparse import Namespace
        from unittest import mock

        from deepspeed.checkpoint import ds_to_universal as ds2u
        from deepspeed.checkpoint.constants import (
            TP_REPLICATED_PARAMETER_PATTERNS,
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        names = [
            n
            for n, p in self.module.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) == 0
        ]
        scalars = [re.escape(n) + "$" for n in names]

        def inject(ckpt) -> None:
            info = ckpt.global_state.get(UNIVERSAL_CHECKPOINT_INFO) or {}
            ckpt.global_state[UNIVERSAL_CHECKPOINT_INFO] = info
            info.setdefault(UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)
            info.setdefault(TP_REPLICATED_PARAMETER_PATTERNS, scalars)

        args = Namespace(
            input_folder=str(step_dir),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        quiet = io.StringIO()
        with (
            mock.patch.object(ds2u, "_inject_missing_state", inject),
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),  # tqdm bars
        ):
            ds2u.main(args)
        # ... and loading chunks every tensor along dim 0, which a 0-dim one lacks ("chunk
        # expects at least a 1-dimensional tensor"): stored as [1], it loads into the scalar
        from deepspeed.checkpoint.constants import PARAM

        for name in names:
            for f in (out / "zero" / name).glob("*.pt"):
                sd = torch.load(f, map_location="cpu", weights_only=False)
                if isinstance(sd, dict) and torch.is_tensor(sd.get(PARAM)) and sd[PARAM].dim() == 0:
                    sd[PARAM] = sd[PARAM].reshape(1)
                    torch.save(sd, f)

    @staticmethod
    def partitioned_checkpoint(step_dir: Path) -> bool:
        """Whether the checkpoint holds per-rank optimizer partitions (ZeRO 1-3, or bf16/fp16
        at ZeRO 0); a ZeRO-0 fp32 checkpoint holds one whole optimizer state any world loads."""
        return any(step_dir.glob("*optim_states.pt"))

    def partition_numels(self) -> list[int] | None:
        """Every parameter's full size when parameters are partitioned (ZeRO-3), else None."""
        if self.zero_stage != 3:
            return None
        return [p.ds_numel for p in self.module.parameters()]

    # --- parameter partitions (historical model) -----------------------------------------------

    def partitions(self) -> list[torch.Tensor]:
        """This rank's share of every parameter, as live tensors (order = named_parameters).

        Under ZeRO-3 that is the flat local partition (``ds_tensor``); under ZeRO 0-2 the whole
        (replicated) parameter. A historical model keeps fp32 tensors shaped like these.
        """
        out = []
        for p in self.module.parameters():
            out.append(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
        return out

    @contextlib.contextmanager
    def swapped_weights(self, shards: list[torch.Tensor]):
        """Run the module with other weights (one tensor per partition), then restore.

        Under ZeRO-3 the swap touches only local partitions; the usual forward hooks gather them,
        so a historical forward costs what a normal no-grad forward costs. The values are copied
        in place (saved, overwritten, restored) rather than re-pointed: ZeRO-3 partitions are
        views into flat buffers, and after an optimizer step some gathers read those buffers,
        not the parameter's ``ds_tensor`` object.
        """
        targets = self.partitions()
        assert len(targets) == len(shards)
        with torch.no_grad():
            saved = [t.clone() for t in targets]
            for t, s in zip(targets, shards):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, old in zip(self.partitions(), saved):
                    t.copy_(old)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU in fp32; a collective under ZeRO-3 (all ranks call).

        Under ZeRO-3 every parameter is rebuilt from the ranks' local partitions with a plain
        all-gather. DeepSpeed's GatheredParameters is not used: on CPU/gloo (0.19.7) two
        consecutive gathers of the large token embedding were seen to return different values.
        """
        from pipeline.collectives import all_gather_cat

        state = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        if self.zero_stage == 3:
            for name, p in self.module.named_parameters():
                flat = all_gather_cat(p.ds_tensor.detach().float().flatten())
                state[name] = flat[: p.ds_numel].view(p.ds_shape).cpu().clone()
        return state


def checkpoint_safe_types() -> list:
    """DeepSpeed objects that its checkpoint files legitimately hold (plain data classes), for
    ``torch.load(weights_only=True)`` vetting."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO 1-2 param -> flat offsets

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def read_zero_checkpoint(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO 1-3 checkpoint dir, stitched from every rank's optimizer partition
    by DeepSpeed's zero_to_fp32: no engine, no process group, any world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout is the caller's
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_path.parent), tag=ckpt_path.name)


def write_ds_config(engine: Engine, path: str | Path) -> None:
    Path(path).write_text(json.dumps(engine.ds_config, indent=2))
