"""dissect-export: a run's checkpoint -> a state dict that open_clip loads by the run's model name.

Two real runs (module-scoped): ZeRO-3 on 2 gloo ranks through torchrun, and ZeRO-0 in one
process. The export must give the same features as the run's model.pt, which the trainer writes
itself (gathering ZeRO-3 partitions through the live engine), and it must work offline, in one
process, with no process group.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from procutil import run_cmd, torchrun
from shardutil import digits, write_digit_shards

from pipeline.cmd_export import main
from pipeline.model import register_model_configs

COMMON = [
    "--config",
    "configs/tiny-cpu.yaml",
    "optim.max_steps=4",
    "checkpoint.every_steps=2",
    "eval.at_end=false",
    "log.tensorboard=false",
    "log.progress=false",
]


def _train(cmd: list[str], run_dir: Path, timeout: int) -> Path:
    p = run_cmd(cmd, timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "model.pt").is_file()
    return run_dir


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("exp") / "train"
    write_digit_shards(d, n_shards=4, per_shard=32)
    return d


@pytest.fixture(scope="module")
def zero3_run(shards) -> Path:
    run = shards.parent / "z3"
    cmd = [
        *torchrun(2),
        "-m",
        "pipeline.train",
        *COMMON,
        f"data.train={shards}",
        f"run.dir={run}",
        "deepspeed.zero_stage=3",
    ]
    return _train(cmd, run, timeout=240)


@pytest.fixture(scope="module")
def zero0_run(shards) -> Path:
    run = shards.parent / "z0"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        *COMMON,
        f"data.train={shards}",
        f"run.dir={run}",
    ]
    return _train(cmd, run, timeout=180)


def _features(path: Path, name: str = "tiny-vit") -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of a fixed batch under the weights at ``path`` (open_clip loader)."""
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    model.eval()
    imgs, labels = digits()
    batch = torch.stack(
        [preprocess(Image.fromarray((imgs[i] * 15).astype(np.uint8))) for i in range(8)]
    )
    tokens = open_clip.get_tokenizer(name)(
        [f"a photo of the digit {int(labels[i])}." for i in range(8)]
    )
    with torch.no_grad():
        return model.encode_image(batch, normalize=True), model.encode_text(tokens, normalize=True)


def _export(run: Path, out: Path, *extra: str) -> int:
    return main([str(run), "--out", str(out), *extra])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero3_two_ranks_export_matches_model_pt(zero3_run, tmp_path):
    ckpt = zero3_run / "checkpoints" / "step_00000004"
    assert (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # really partitioned
    out = tmp_path / "model.pt"
    assert _export(zero3_run, out) == 0
    assert set(torch.load(out, weights_only=True)) == set(
        torch.load(zero3_run / "model.pt", weights_only=True)
    )
    img, txt = _features(out)
    ref_img, ref_txt = _features(zero3_run / "model.pt")
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-4)

    # an earlier tag is a different model: the default really is the newest checkpoint
    early = tmp_path / "early.pt"
    assert _export(zero3_run, early, "--tag", "step_00000002") == 0
    assert not torch.allclose(_features(early)[0], ref_img, atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_zero0_export_matches_model_pt(zero0_run, tmp_path):
    out = tmp_path / "m.pt"
    assert _export(zero0_run, out) == 0
    sd = torch.load(out, weights_only=True)  # plain tensors only
    assert all(v.dtype == torch.float32 for v in sd.values())
    for got, want in zip(_features(out), _features(zero0_run / "model.pt")):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_export_skips_an_unfinished_save(zero0_run, tmp_path, capsys):
    """`latest` naming a save that never completed: export takes the last complete checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(zero0_run, run)
    ck = run / "checkpoints"
    shutil.copytree(ck / "step_00000004", ck / "step_00000006")
    (ck / "step_00000006" / "COMPLETE").unlink()
    (ck / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (ck / "latest").write_text("step_00000006\n")
    out = tmp_path / "m.pt"
    assert _export(run, out) == 0
    assert "step_00000004" in capsys.readouterr().out
    # asking for the unfinished one by name is refused, and nothing is left at --out
    bad = tmp_path / "bad.pt"
    assert _export(run, bad, "--tag", "step_00000006") == 2
    assert "COMPLETE" in capsys.readouterr().err and not bad.exists()


class Payload:
    """Stands for an arbitrary pickled object: weights_only loading must refuse it."""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_export_refuses_pickled_code(zero0_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero0_run, run)
    f = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    sd = torch.load(f, weights_only=True)
    sd["extra"] = Payload()
    torch.save(sd, f)
    out = tmp_path / "m.pt"
    assert _export(run, out) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "Payload" in err and not out.exists()


@pytest.mark.timeout(60)
def test_export_without_checkpoints_fails_cleanly(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model:\n  name: tiny-vit\n")
    (tmp_path / "checkpoints").mkdir()
    assert _export(tmp_path, tmp_path / "m.pt") == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert _export(tmp_path / "nope", tmp_path / "m.pt") == 2
    assert "config.yaml" in capsys.readouterr().err


# --- docs/training.md's way to load an export, verbatim, in a fresh interpreter -----------------


def readme_export_snippet() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    after = text.split("<!-- export-snippet", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def _run_snippet(export_dir: Path, cwd: Path) -> str:
    """The docs/training.md block with its example path pointed at ``export_dir``, in a new Python."""
    code = readme_export_snippet()
    assert '"local-dir:exports/demo"' in code
    code = code.replace("exports/demo", str(export_dir))
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_folder_export_loads_as_the_readme_says(zero0_run, tmp_path):
    """A configs/models model (tiny-vit): export folder -> README snippet in a fresh Python,
    started outside the repository; dissect-eval reads the folder too."""
    out = tmp_path / "exports" / "tiny"
    assert _export(zero0_run, out) == 0
    assert {p.name for p in out.iterdir()} == {
        "open_clip_config.json",
        "open_clip_pytorch_model.bin",
    }
    assert "similarity" in _run_snippet(out, cwd=tmp_path)
    want = _features(zero0_run / "model.pt")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    imgs, _ = digits()
    batch = torch.stack(
        [preprocess(Image.fromarray((imgs[i] * 15).astype(np.uint8))) for i in range(8)]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(batch, normalize=True), want[0], atol=1e-6, rtol=1e-5
        )
    assert _export(zero0_run, out) == 0  # a second export replaces the first
    blocker = tmp_path / "not-an-export"
    blocker.mkdir()
    (blocker / "keep.txt").write_text("mine")
    assert _export(zero0_run, blocker) == 2 and (blocker / "keep.txt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_builtin_vit_b32_export_folder_loads_as_the_readme_says(tmp_path):
    """A built-in open_clip name (ViT-B-32 shape, random weights): same folder, same snippet."""
    from pipeline.export import _open_clip_model, check_loads, write_model_dir

    state = {k: v.float() for k, v in _open_clip_model("ViT-B-32").state_dict().items()}
    out = tmp_path / "vitb32"
    write_model_dir(out, "ViT-B-32", state)
    check_loads(out, "ViT-B-32", state)
    assert "similarity" in _run_snippet(out, cwd=tmp_path)
