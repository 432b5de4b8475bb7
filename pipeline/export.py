"""`dissect-export RUN_DIR --out model.pt [--tag TAG]`: a run's trained weights for open_clip.

    dissect-export runs/demo --out demo.pt
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit", pretrained="demo.pt")

Reads one complete checkpoint of the run (default: the one ``checkpoints/latest`` names, else the
newest with a COMPLETE marker) and writes a plain fp32 state dict with open_clip's key names.
Works offline on one CPU process, whatever ZeRO stage and world size wrote the checkpoint:

- ZeRO 0: the module weights in ``mp_rank_00_model_states.pt`` (cast to fp32).
- ZeRO 1-3: the fp32 master weights, stitched from every rank's optimizer partition by
  DeepSpeed's ``zero_to_fp32`` (no process group needed).

Loading is ``weights_only=True`` where torch allows. DeepSpeed's own loader unpickles its
optimizer files with ``weights_only=False`` (they hold a few DeepSpeed objects: the ZeRO stage
enum, the loss scaler), so every file is first opened with ``weights_only=True`` and only those
types allowed; a file that needs anything else is refused unless ``--trust-checkpoint`` is given.

Before publishing, the written file is loaded back through open_clip under the run's model
name (``model.name`` in the run's config.yaml), so a file that open_clip cannot load is never
left at ``--out``. Exit codes: 0 written, 2 nothing to export / not loadable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ExportError(RuntimeError):
    """Nothing (loadable) to export; the message says what and where."""


def find_checkpoint(run_dir: Path, tag: str | None = None) -> Path:
    """The checkpoint dir to export: ``tag`` (a tag, ``latest``, or a path), else latest complete."""
    ckpt_dir = run_dir / "checkpoints"
    if tag and tag != "latest":
        p = Path(tag) if Path(tag).is_dir() else ckpt_dir / tag
        if not p.is_dir():
            raise ExportError(f"checkpoint {tag!r} not found under {ckpt_dir}")
        if not (p / ckpt.COMPLETE).is_file():
            raise ExportError(f"checkpoint {p} has no {ckpt.COMPLETE} marker: its save did not finish")
        return p
    latest = ckpt.latest_tag(ckpt_dir)
    if latest is None:
        raise ExportError(f"no complete checkpoint under {ckpt_dir}")
    return ckpt_dir / latest


def _safe_types() -> list:
    """DeepSpeed objects that its checkpoint files legitimately hold (plain data classes)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO 1-2 param -> flat offsets

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _load_safe(path: Path, extra_types: list | None = None, mmap: bool = False):
    try:
        with torch.serialization.safe_globals(extra_types or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError, or a RuntimeError from a truncated file
        first = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), None)
        raise ExportError(
            f"{path} cannot be loaded with weights_only=True ({first or type(err).__name__}); "
            "pass --trust-checkpoint if you trust where it came from"
        ) from None


def _module_states_file(ckpt_path: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (ckpt_path / name).is_file():
            return ckpt_path / name
    raise ExportError(f"{ckpt_path} holds no DeepSpeed model states file")


def zero_stage_of(ckpt_path: Path) -> int:
    meta = _load_safe(_module_states_file(ckpt_path), mmap=True)
    return int(((meta.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))


def checkpoint_state_dict(ckpt_path: Path, trust: bool = False) -> tuple[dict, int, int]:
    """(fp32 state dict on CPU, ZeRO stage, world size that wrote it) of one checkpoint dir."""
    stage = zero_stage_of(ckpt_path)
    optim_files = sorted(ckpt_path.glob("*_optim_states.pt"))
    if stage == 0:
        meta = _load_safe(_module_states_file(ckpt_path))
        state = {k: v.detach().float().clone() for k, v in meta["module"].items()}
        return state, 0, int(meta.get("dp_world_size", 1))
    if not optim_files:
        raise ExportError(f"{ckpt_path} is a ZeRO-{stage} checkpoint without *_optim_states.pt files")
    # The one deepspeed import outside pipeline/engine.py: zero_to_fp32 needs no engine and no
    # process group, which engine.py (built around a live DeepSpeed engine) cannot offer.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if not trust:
        extra = _safe_types()
        for f in sorted(ckpt_path.glob("*_states.pt")):
            _load_safe(f, extra, mmap=True)  # vets the pickle; tensors stay on disk (mmap)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout is our result
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_path.parent), tag=ckpt_path.name)
    state = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
    return state, stage, len(optim_files)


def run_model_name(run_dir: Path) -> str:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"{run_dir} has no config.yaml: is it a run directory?")
    try:
        return load_config(cfg_path).model.name
    except ConfigError as err:
        raise ExportError(f"{cfg_path}: {err}") from None


def check_loads(path: Path, model_name: str, state: dict) -> None:
    """open_clip builds ``model_name`` from ``path`` (strict) and holds exactly ``state``."""
    import open_clip

    from pipeline.model import register_model_configs

    register_model_configs()
    try:
        model = open_clip.create_model(model_name, pretrained=str(path))
    except Exception as err:
        raise ExportError(f"open_clip cannot load the export as {model_name!r}: {err}") from None
    loaded = model.state_dict()
    for k, v in state.items():
        if k not in loaded or not torch.equal(loaded[k].float(), v):
            raise ExportError(f"open_clip loaded {model_name!r} but {k!r} differs from the checkpoint")


def export(run_dir: str | Path, out: str | Path, tag: str | None = None, trust: bool = False,
           verify: bool = True) -> dict:
    """Write the checkpoint's weights to ``out`` (atomically); returns a summary."""
    run_dir, out = Path(run_dir), Path(out)
    name = run_model_name(run_dir)
    ckpt_path = find_checkpoint(run_dir, tag)
    state, stage, world = checkpoint_state_dict(ckpt_path, trust)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        if verify:
            check_loads(tmp, name, state)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"model": name, "checkpoint": str(ckpt_path), "zero_stage": stage, "world_size": world,
            "tensors": len(state), "params": sum(v.numel() for v in state.values()), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dissect-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
    ap.add_argument("--out", required=True, help="file to write (an open_clip state dict)")
    ap.add_argument("--tag", help="checkpoint tag (step_00000100), 'latest' or a checkpoint dir")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="skip the weights_only vetting of DeepSpeed's optimizer files")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the result through open_clip")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    import pipeline  # noqa: F401  (torchvision compat before open_clip)

    try:
        info = export(args.run_dir, args.out, args.tag, args.trust_checkpoint, not args.no_verify)
    except ExportError as err:
        print(f"dissect-export: {err}", file=sys.stderr)
        return 2
    print(f"exported {info['checkpoint']} (ZeRO-{info['zero_stage']}, {info['world_size']} rank(s), "
          f"{info['params']:,} params) as {info['model']!r} -> {info['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
