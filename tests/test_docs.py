"""The documentation stays true to the code: every link and file it names exists, the config
reference is the one the dataclasses generate, and every docs/ page opens with a snippet that
is run or checked here (docs/launching.md's commands: tests/test_launch_common.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*/README.md"))
TOP = ("pipeline", "data_prep", "dissect_common", "launch", "benchmarks", "configs", "scripts")
TOP += ("tests", "docs")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def references(page: Path) -> list[tuple[str, Path, str]]:
    """(as written, the file it names, anchor) for each markdown link and `path` it holds."""
    text = page.read_text()
    refs = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        refs.append((target, (page.parent / path).resolve() if path else page, anchor))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\s]+)`", prose):
        first = span.split("/")[0]
        if first in TOP and "/" in span and not re.search(r"[<*{$]|\.\.\.", span):
            refs.append((span, ROOT / span.rstrip("/").split(":")[0], ""))
    return refs


@pytest.mark.parametrize("page", PAGES + RESULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_file_reference_exists(page):
    broken = []
    for written, path, anchor in references(page):
        if not path.exists():
            broken.append(f"{written}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{written}: no heading #{anchor} in {path.name}")
    assert broken == [], f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_no_page_cites_a_design_file_that_does_not_exist():
    for page in PAGES:
        for name in re.findall(r"[\w/.]*DESIGN\.md", page.read_text()):
            assert (page.parent / name).exists() or (ROOT / name).exists(), (page, name)


def test_readme_first_screen_has_the_commands_demo_data_and_cluster():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    for needed in (
        "make demo",
        "make test",
        "zero-shot top-1",  # what the demo prints
        "## Train on your own shards",
        "## Launch on a cluster",
    ):
        assert needed in first_screen, needed


# --- the generated config reference ----------------------------------------------------------


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_doc", ROOT / "scripts/gen_config_doc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_matches_the_dataclasses():
    gen = load_generator()
    page = gen.PAGE.read_text()
    assert gen.render(page) == page, f"docs/training.md is out of date: run `{gen.COMMAND}`"


def test_config_reference_names_every_key():
    import dataclasses

    from pipeline.config import Config

    text = (ROOT / "docs" / "training.md").read_text()
    for section in dataclasses.fields(Config):
        body = text.split(f"### `{section.name}`\n", 1)[1].split("\n### ", 1)[0]
        for f in dataclasses.fields(section.default_factory):
            assert f"| `{f.name}` |" in body, f"{section.name}.{f.name}"


def test_config_reference_fails_on_drift(tmp_path):
    """A page whose reference lost a row is reported, with the command that fixes it."""
    gen = load_generator()
    stale = gen.PAGE.read_text().replace("| `seed` |", "| `seeds` |", 1)
    gen.PAGE = tmp_path / "training.md"
    gen.PAGE.write_text(stale)
    gen.ROOT = tmp_path.parent
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert gen.main(["--check"]) == 1
    assert "python scripts/gen_config_doc.py" in err.getvalue()


# --- each docs/ page opens with a snippet that is run or checked ---------------------------------


def opening_snippet(page: Path) -> tuple[str, str]:
    """The first fenced block, which must come before the page's first section."""
    text = page.read_text()
    head = text.split("\n## ", 1)[0]
    blocks = fenced_blocks(head)
    assert blocks, f"{page.name} does not open with a snippet"
    return blocks[0]


def command_lines(body: str) -> list[list[str]]:
    joined = body.replace("\\\n", " ")
    return [shlex.split(ln, comments=True) for ln in joined.splitlines() if ln.strip()]


def check_train(words: list[str]) -> None:
    from pipeline.config import load_config

    assert "--config" in words, words
    config = words[words.index("--config") + 1]
    overrides = [w for w in words[1:] if "=" in w and not w.startswith("-")]
    load_config(ROOT / config, overrides)  # raises ConfigError naming the key


def check_prep(words: list[str]) -> None:
    from data_prep.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{shlex.join(words)}: {err.getvalue()}")


def check_benchmark(words: list[str]) -> None:
    module = words[words.index("-m") + 1]
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    for opt in (w.split("=")[0] for w in words if w.startswith("--")):
        assert f'"{opt}"' in source, f"{module} has no option {opt}"
    for w in words:
        if w.startswith("configs/"):
            assert (ROOT / w).is_file(), w


def check_commands(body: str) -> int:
    checked = 0
    for words in command_lines(body):
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words = words[1:]
        if not words:
            continue
        if words[0] == "dissect-train":
            check_train(words)
        elif words[0] == "dissect-prep":
            check_prep(words)
        elif words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
            check_benchmark(words)
        else:
            continue
        checked += 1
    return checked


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_docs_page_opens_with_a_snippet_that_is_checked(page):
    """A bash snippet's dissect-train / dissect-prep / benchmark lines are checked here (a page
    of launch commands is dry-run by tests/test_launch_common.py); a python snippet runs in
    test_design_page_snippet_runs. A new page must open with one of these."""
    lang, body = opening_snippet(page)
    if page.name == "launching.md":
        assert lang == "bash" and "--dry-run" in body and body.startswith("launch/")
    elif page.name == "design.md":
        assert lang == "python"
    else:
        assert lang == "bash", f"{page.name}: open with a bash or python snippet"
        assert check_commands(body) >= 1, f"{page.name}: its snippet has no command checked here"


def test_readme_training_commands_check():
    text = (ROOT / "README.md").read_text()
    bodies = [body for lang, body in fenced_blocks(text) if lang == "bash"]
    assert sum(check_commands(body) for body in bodies) >= 3


def test_design_page_snippet_runs():
    lang, body = opening_snippet(ROOT / "docs" / "design.md")
    assert lang == "python"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(body, "docs/design.md", "exec"), {})
    m = re.match(r"kept per rank \[(\d+), (\d+)\] \| moved between ranks (\d+)", out.getvalue())
    assert m, out.getvalue()
    kept, moved = [int(m.group(1)), int(m.group(2))], int(m.group(3))
    assert sum(kept) == 4 and moved == sum(max(k - 2, 0) for k in kept)  # k = W b, b = 2
