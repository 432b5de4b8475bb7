"""--help and configuration mistakes answer before torch is imported (so at once, even on a
loaded machine: importing torch, open_clip and deepspeed takes 5-45 s there)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TORCH = ("torch", "torchvision", "open_clip", "deepspeed")
PROBE = """
import sys
from {module} import {fn} as entry
try:
    rc = entry({argv!r})
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("RESULT", rc, heavy)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "module,fn,argv,rc",
    [
        ("curate", "main", ["--help"], 0),  # --help of every script: the tests below
        ("train", "main", ["--config", "configs/tiny-cpu.yaml", "optim.lr=abc"], 2),
        ("train", "main", ["--config", "configs/tiny-cpu.yaml", "optim.nope=1"], 2),
        ("train", "main", ["--config", "no/such.yaml"], 2),
    ],
)
def test_answers_without_importing_torch(module, fn, argv, rc):
    heavy = (*TORCH, "pandas") if module == "curate" else TORCH  # curate defers pandas too
    code = PROBE.format(module=f"pipeline.{module}", fn=fn, argv=argv, heavy=heavy)
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    result = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    assert result == [f"RESULT {rc} []"], p.stdout[-2000:] + p.stderr[-2000:]
    if rc == 2:
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line, no traceback


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts] table (tomllib is 3.11+; the project supports 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    pairs = re.findall(r'^([\w-]+) = "([\w.]+:\w+)"$', table, flags=re.M)
    assert pairs, "no console scripts found in pyproject.toml"
    return dict(pairs)


CONSOLE_SCRIPTS = console_scripts()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_console_scripts_answer_help(script):
    """The installed executable (pip install -e . made it from pyproject.toml)."""
    p = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_every_console_script_helps_without_torch(script):
    """Every entry of [project.scripts], called as the console script calls it, with --help."""
    module, fn = CONSOLE_SCRIPTS[script].split(":")
    code = PROBE.format(module=module, fn=fn, argv=["--help"], heavy=TORCH)
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    result = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    assert result == ["RESULT 0 []"], p.stdout[-2000:] + p.stderr[-2000:]
    assert f"usage: {script}" in p.stdout


# --- import arrows: data_prep and pipeline share dissect_common and never import each other ---

PACKAGES = ("pipeline", "data_prep", "dissect_common")


def imports_of(path: Path, ours: set[str]) -> set[str]:
    """Our modules a file imports, at the top or inside a function. `from pkg import mod` counts
    as importing `pkg.mod` only (what Python runs first, pkg/__init__, is the parent's, not an
    arrow of this file)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            subs = {f"{base}.{a.name}" for a in node.names} & ours
            found.update(subs or {base})
    return found & ours


def module_graph() -> dict[str, set[str]]:
    """Our modules -> our modules they import."""
    files = {
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
        for pkg in PACKAGES
        for f in (ROOT / pkg).rglob("*.py")
    }
    return {name: imports_of(f, set(files)) - {name} for name, f in files.items()}


def test_data_prep_and_pipeline_do_not_import_each_other():
    graph = module_graph()
    crossing = [
        f"{a} imports {b}"
        for a, deps in graph.items()
        for b in deps
        if a.split(".")[0] != b.split(".")[0]
        and not (b.split(".")[0] == "dissect_common" and a.split(".")[0] != "dissect_common")
    ]
    assert crossing == [], "data_prep and pipeline share only dissect_common"


def test_pipeline_has_no_import_circle():
    graph = {a: {b for b in deps if b.startswith("pipeline")} for a, deps in module_graph().items()}
    graph = {a: deps for a, deps in graph.items() if a.startswith("pipeline")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [node, dep]
            if dep not in state and (circle := visit(dep, [*path, dep])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            raise AssertionError("import circle: " + " -> ".join(circle))
