"""--help and configuration mistakes answer before torch is imported (so at once, even on a
loaded machine: importing torch, open_clip and deepspeed takes 5-45 s there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

PROBE = """
import sys
from pipeline.{module} import {fn} as entry
try:
    rc = entry({argv!r})
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "torchvision", "open_clip", "deepspeed") if m in sys.modules)
print("RESULT", rc, heavy)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "module,fn,argv,rc",
    [
        ("train", "main", ["--help"], 0),
        ("cli", "eval_main", ["--help"], 0),
        ("cli", "export_main", ["--help"], 0),
        ("train", "main", ["--config", "configs/tiny-cpu.yaml", "optim.lr=abc"], 2),
        ("train", "main", ["--config", "configs/tiny-cpu.yaml", "optim.nope=1"], 2),
        ("train", "main", ["--config", "no/such.yaml"], 2),
    ],
)
def test_answers_without_importing_torch(module, fn, argv, rc):
    code = PROBE.format(module=module, fn=fn, argv=argv)
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    result = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    assert result == [f"RESULT {rc} []"], p.stdout[-2000:] + p.stderr[-2000:]
    if rc == 2:
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line, no traceback


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "script", ["dissect-train", "dissect-eval", "dissect-export", "dissect-prep"]
)
def test_console_scripts_answer_help(script):
    p = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
