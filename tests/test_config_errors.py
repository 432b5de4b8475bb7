"""Wrong configs and wrong paths fail before any work, with exit code 2 and one stderr line.

Each case goes through the real entry point, `pipeline.train.main([... "--check"])`, in-process
(a subprocess costs ~7 s of imports; one case runs through `python -m pipeline.train` to pin the
real CLI's stderr). A case names the text its one line must contain: the field (or the file /
path) the user has to fix.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from procutil import run_cmd
from shardutil import write_digit_shards

from pipeline.train import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cfg")
    d = {
        "train": base / "train",
        "val": base / "val",
        "empty": base / "empty",
        "badtpl": base / "badtpl",
        "nocls": base / "nocls",
        "emptycls": base / "emptycls",
        "emptytpl": base / "emptytpl",
        "notar": base / "notar",
    }
    write_digit_shards(d["train"], n_shards=2, per_shard=8)
    write_digit_shards(d["val"], n_shards=1, per_shard=8, uid_offset=100, with_val_meta=True)
    d["empty"].mkdir()
    write_digit_shards(d["badtpl"], n_shards=1, per_shard=4, with_val_meta=True)
    (d["badtpl"] / "templates.txt").write_text("a photo of the digit {}.\na photo of a digit\n")
    write_digit_shards(d["nocls"], n_shards=1, per_shard=4)
    write_digit_shards(d["emptycls"], n_shards=1, per_shard=4, with_val_meta=True)
    (d["emptycls"] / "classnames.txt").write_text("\n")
    write_digit_shards(d["emptytpl"], n_shards=1, per_shard=4, with_val_meta=True)
    (d["emptytpl"] / "templates.txt").write_text("")
    d["notar"].mkdir()
    (d["notar"] / "readme.txt").write_text("not a shard")
    return d


def _base(dirs) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["train"] = str(dirs["train"])
    raw["data"]["val"] = str(dirs["val"])
    return raw


def _run(capsys, tmp_path, dirs, text: str | None, overrides: list[str]) -> tuple[int, list[str]]:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text if text is not None else yaml.safe_dump(_base(dirs)))
    capsys.readouterr()
    rc = main(["--config", str(cfg), *[o.format(**dirs) for o in overrides], "--check"])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


# (id, YAML text or None for the valid base, overrides, text the error line must contain)
# Overrides are formatted with the fixture dirs: "{empty}" is the empty directory.
BAD: list[tuple[str, str | None, list[str], str]] = [
    # keys and sections
    ("unknown-key", None, ["data.batchsize=32"], "data.batchsize"),
    ("unknown-section", None, ["trainer.lr=1"], "'trainer'"),
    ("unknown-nested", None, ["optim.adam.beta=0.9"], "optim.adam"),
    ("unknown-key-yaml", "data:\n  trian: x\n", [], "data.trian"),
    ("section-not-mapping", None, ["data=5"], "data must be a mapping"),
    ("section-list-yaml", "optim:\n  - lr\n", [], "optim must be a mapping"),
    # types
    ("int-from-str", None, ["data.batch_size=abc"], "data.batch_size"),
    ("int-from-float", None, ["data.batch_size=1.5"], "data.batch_size"),
    ("int-from-bool", None, ["deepspeed.zero_stage=true"], "deepspeed.zero_stage"),
    ("float-from-str", "selection:\n  ratio: 'a fifth'\n", [], "selection.ratio"),
    ("float-from-bool", None, ["optim.lr=false"], "optim.lr"),
    ("bool-from-int", None, ["data.resampled=3"], "data.resampled"),
    ("str-from-list", None, ["model.name=[a, b]"], "model.name"),
    ("list-item-mapping", None, ["data.train={{a: 1}}"], "data.train[0]"),
    # sizes and ranges
    ("negative-batch", None, ["data.batch_size=-1"], "data.batch_size"),
    ("zero-batch", None, ["data.batch_size=0"], "data.batch_size"),
    ("negative-workers", None, ["data.workers=-2"], "data.workers"),
    ("zero-val-batch", None, ["data.val_batch_size=0"], "data.val_batch_size"),
    ("negative-shuffle", None, ["data.shuffle_buffer=-5"], "data.shuffle_buffer"),
    ("skip-frac>1", None, ["data.max_skip_frac=1.5"], "data.max_skip_frac"),
    ("negative-seed", None, ["run.seed=-1"], "run.seed"),
    ("name-with-slash", None, ["run.name=a/b"], "run.name"),
    ("lr-zero", None, ["optim.lr=0"], "optim.lr"),
    ("lr-nan", None, ["optim.lr=.nan"], "optim.lr"),
    ("lr-inf", None, ["optim.lr=.inf"], "optim.lr"),
    ("epochs-inf", None, ["optim.epochs=.inf"], "optim.epochs"),
    ("epochs-zero", None, ["optim.epochs=0"], "optim.epochs"),
    ("beta2-one", None, ["optim.beta2=1.0"], "optim.beta2"),
    ("negative-max-steps", None, ["optim.max_steps=-3"], "optim.max_steps"),
    ("ratio-zero", None, ["selection.ratio=0"], "selection.ratio"),
    ("ratio-above-one", None, ["selection.ratio=1.5"], "selection.ratio"),
    ("ratio-negative", None, ["selection.ratio=-0.2"], "selection.ratio"),
    (
        "super-batch-fraction",
        None,
        ["selection.method=dissect", "selection.ratio=0.3"],
        "data.batch_size / selection.ratio",
    ),
    ("ema-momentum-one", None, ["selection.ema_momentum=1"], "selection.ema_momentum"),
    ("unknown-method", None, ["selection.method=dissct"], "selection.method"),
    ("unknown-history", None, ["selection.history=moving"], "selection.history"),
    ("zero-stage-4", None, ["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    ("precision-fp8", None, ["deepspeed.precision=fp8"], "deepspeed.precision"),
    ("zero-log-every", None, ["log.every_steps=0"], "log.every_steps"),
    ("negative-keep", None, ["checkpoint.keep=-1"], "checkpoint.keep"),
    ("negative-eval-every", None, ["eval.every_steps=-10"], "eval.every_steps"),
    # paths
    (
        "missing-train-shard",
        None,
        ["data.train=/nonexistent/shards/{{0..3}}.tar"],
        "/nonexistent/shards/0.tar",
    ),
    ("empty-train-dir", None, ["data.train={empty}"], "holds no .tar shards"),
    ("no-tar-in-dir", None, ["data.train={notar}"], "holds no .tar shards"),
    ("no-train-at-all", None, ["data.train=[]"], "data.train"),
    ("missing-val-shard", None, ["data.val=/nonexistent/val"], "data.val"),
    ("empty-val-dir", None, ["data.val={empty}"], "data.val"),
    ("missing-val-retrieval", None, ["data.val_retrieval=/nonexistent/ret"], "data.val_retrieval"),
    ("val-template-without-braces", None, ["data.val={badtpl}"], "a photo of a digit"),
    ("val-empty-classnames", None, ["data.val={emptycls}"], "classnames.txt is empty"),
    ("val-empty-templates", None, ["data.val={emptytpl}"], "templates.txt is empty"),
    ("unknown-model", None, ["model.name=ViT-Q-99"], "model.name"),
    # override syntax and the file itself
    ("override-no-equals", None, ["data.batch_size"], "section.key=value"),
    ("override-empty-key", None, ["=5"], "section.key=value"),
    ("override-space-in-key", None, ["data. batch_size=5"], "section.key=value"),
    (
        "override-through-scalar",
        None,
        ["data.batch_size=4", "data.batch_size.x=1"],
        "data.batch_size",
    ),
    ("yaml-not-mapping", "- a\n- b\n", [], "must hold a mapping"),
    ("yaml-scalar", "just words\n", [], "must hold a mapping"),
    ("yaml-invalid", "data: {batch_size: 32\n", [], "is not valid YAML"),
    ("yaml-python-tag", "run: !!python/object/apply:os.system ['true']\n", [], "is not valid YAML"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case_id,text,overrides,needle", BAD, ids=[c[0] for c in BAD])
def test_bad_config_fails_with_one_line(capsys, tmp_path, dirs, case_id, text, overrides, needle):
    rc, lines = _run(capsys, tmp_path, dirs, text, overrides)
    assert rc == 2, (rc, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("dissect-train: config error: "), lines[0]
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.timeout(60)
def test_missing_config_file(capsys, tmp_path):
    capsys.readouterr()
    rc = main(["--config", str(tmp_path / "nope.yaml"), "--check"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "nope.yaml" in lines[0] and "does not exist" in lines[0]


GOOD: list[tuple[str, list[str]]] = [
    ("base", []),
    ("dissect", ["selection.method=dissect", "selection.ratio=0.25", "selection.history=ema"]),
    ("zero3-bf16", ["deepspeed.zero_stage=3", "deepspeed.precision=bf16"]),
    ("brace-pattern", ["data.train={train}/0000{{0..1}}.tar", "data.val=''"]),
    ("list-of-shards", ["data.train=[{train}/00000.tar, {train}/00001.tar]"]),
    ("int-for-float", ["optim.lr=1", "optim.epochs=3", "selection.ratio=1"]),
    ("val-without-classnames", ["data.val={nocls}"]),  # retrieval-only evaluation
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case_id,overrides", GOOD, ids=[c[0] for c in GOOD])
def test_good_config_passes(capsys, tmp_path, dirs, case_id, overrides):
    rc, lines = _run(capsys, tmp_path, dirs, None, overrides)
    assert rc == 0, lines


@pytest.mark.timeout(120)
def test_cli_prints_exactly_one_line(dirs):
    """The real command line (one case: each costs ~7 s of imports): nothing else reaches stderr,
    no warning from importing DeepSpeed, no traceback."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--config",
        str(TINY),
        f"data.train={dirs['train']}",
        "deepspeed.zero_stage=4",
        "--check",
    ]
    p = run_cmd(cmd, timeout=100)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "deepspeed.zero_stage" in lines[0], p.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override", ["data.train=/nonexistent/x.tar", "data.train={empty}", "data.val={badtpl}"]
)
def test_path_errors_name_the_field(capsys, tmp_path, dirs, override):
    rc, lines = _run(capsys, tmp_path, dirs, None, [override])
    field = override.split("=")[0]
    assert rc == 2 and len(lines) == 1 and f"{field}:" in lines[0], lines
