"""`dissect-export RUN_DIR --out DIR [--tag TAG]`: a run's trained weights for open_clip.

    dissect-export runs/demo --out exports/demo
    import pipeline  # torchvision beside the CPU torch wheel (a no-op where it imports cleanly)
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exports/demo")
    tokenizer = open_clip.get_tokenizer("local-dir:exports/demo")

``DIR`` is the folder open_clip's ``local-dir:`` loader reads: ``open_clip_config.json`` (the
model's architecture and preprocessing, so configs under configs/models need no registering)
and ``open_clip_pytorch_model.bin`` (a plain fp32 state dict). An ``--out`` ending in ``.pt``
writes only that state dict, for loading code of your own.

Reads one complete checkpoint of the run (default: the one ``checkpoints/latest`` names, else the
newest with a COMPLETE marker). Works offline on one CPU process, whatever ZeRO stage and world
size wrote the checkpoint:

- ZeRO 0: the module weights in ``mp_rank_00_model_states.pt`` (cast to fp32).
- ZeRO 1-3: the fp32 master weights, stitched from every rank's optimizer partition by
  DeepSpeed's ``zero_to_fp32`` (no process group needed).

Loading is ``weights_only=True`` where torch allows. DeepSpeed's own loader unpickles its
optimizer files with ``weights_only=False`` (they hold a few DeepSpeed objects: the ZeRO stage
enum, the loss scaler), so every file is first opened with ``weights_only=True`` and only those
types allowed; a file that needs anything else is refused unless ``--trust-checkpoint`` is given.

Before publishing, the export is loaded back through open_clip (the folder through
``local-dir:``, a ``.pt`` under the run's ``model.name``), so nothing that open_clip cannot load
is ever left at ``--out``. Exit codes: 0 written, 2 nothing to export / not loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, load_config


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
            raise ExportError(
                f"checkpoint {p} has no {ckpt.COMPLETE} marker: its save did not finish"
            )
        return p
    latest = ckpt.latest_tag(ckpt_dir)
    if latest is None:
        raise ExportError(f"no complete checkpoint under {ckpt_dir}")
    return ckpt_dir / latest


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
        raise ExportError(
            f"{ckpt_path} is a ZeRO-{stage} checkpoint without *_optim_states.pt files"
        )
    from pipeline import engine  # DeepSpeed's zero_to_fp32 lives behind the engine module

    if not trust:
        extra = engine.checkpoint_safe_types()
        for f in sorted(ckpt_path.glob("*_states.pt")):
            _load_safe(f, extra, mmap=True)  # vets the pickle; tensors stay on disk (mmap)
    state = engine.read_zero_checkpoint(ckpt_path)
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


CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_pytorch_model.bin"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def _open_clip_model(name: str):
    """open_clip's model for ``name`` (built-in or configs/models), random init, no download."""
    import open_clip

    from pipeline.model import quiet_random_init, register_model_configs

    register_model_configs()
    with quiet_random_init():
        return open_clip.create_model(name)


def write_model_dir(d: Path, name: str, state: dict) -> None:
    """The folder open_clip's ``local-dir:`` loader reads: model + preprocess config and weights."""
    import open_clip

    model = _open_clip_model(name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"the checkpoint does not fit model {name!r}: {str(err)[:300]}") from None
    conf = {
        "model_cfg": open_clip.get_model_config(name),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    d.mkdir(parents=True)
    (d / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + "\n")
    torch.save(state, d / WEIGHTS_FILE)


def check_loads(path: Path, model_name: str, state: dict) -> None:
    """open_clip builds the model from ``path`` (a folder via ``local-dir:``, a file under
    ``model_name``) and it holds exactly ``state``."""
    import open_clip

    from pipeline.model import quiet_random_init, register_model_configs

    register_model_configs()
    try:
        with quiet_random_init():
            if path.is_dir():
                model = open_clip.create_model(f"local-dir:{path}")
            else:
                model = open_clip.create_model(model_name, pretrained=str(path))
    except Exception as err:
        raise ExportError(f"open_clip cannot load the export as {model_name!r}: {err}") from None
    loaded = model.state_dict()
    for k, v in state.items():
        if k not in loaded or not torch.equal(loaded[k].float(), v):
            raise ExportError(
                f"open_clip loaded {model_name!r} but {k!r} differs from the checkpoint"
            )


def _publish(tmp: Path, out: Path) -> None:
    """Move the verified ``tmp`` to ``out``; an earlier export there is replaced, nothing else."""
    if out.is_dir():
        if not (out / CONFIG_FILE).is_file():
            raise ExportError(f"--out {out} is a folder that is not an export; give a new path")
        old = out.with_name(out.name + f".old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def export(
    run_dir: str | Path,
    out: str | Path,
    tag: str | None = None,
    trust: bool = False,
    verify: bool = True,
) -> dict:
    """Write the checkpoint's weights to ``out`` (a folder, or a ``.pt`` state dict) atomically."""
    run_dir, out = Path(run_dir), Path(out)
    name = run_model_name(run_dir)
    ckpt_path = find_checkpoint(run_dir, tag)
    state, stage, world = checkpoint_state_dict(ckpt_path, trust)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        if out.suffix in STATE_DICT_SUFFIXES:
            torch.save(state, tmp)
        else:
            write_model_dir(tmp, name, state)
        if verify:
            check_loads(tmp, name, state)
        _publish(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
    return {
        "model": name,
        "checkpoint": str(ckpt_path),
        "zero_stage": stage,
        "world_size": world,
        "tensors": len(state),
        "params": sum(v.numel() for v in state.values()),
        "out": str(out),
    }


def run(args) -> int:
    """dissect-export after its arguments are parsed (pipeline.cmd_export)."""
    try:
        info = export(args.run_dir, args.out, args.tag, args.trust_checkpoint, not args.no_verify)
    except ExportError as err:
        print(f"dissect-export: {err}", file=sys.stderr)
        return 2
    print(
        f"exported {info['checkpoint']} (ZeRO-{info['zero_stage']}, {info['world_size']} rank(s), "
        f"{info['params']:,} params) as {info['model']!r} -> {info['out']}"
    )
    return 0
