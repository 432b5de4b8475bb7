"""launch/: what every launcher shares. --dry-run anywhere on the command line; a bad config or a
malformed hostfile is refused with one line before anything starts; every launch command in
docs/launching.md and in the README's launch section runs as a dry run. (Per launcher:
test_launch_single.py, test_launch_multi.py, test_launch_slurm.py.)
"""

from __future__ import annotations

import os
import re
import shlex

import pytest
from launchutil import (
    CONFIG,
    ENTRIES,
    LAUNCH,
    ROOT,
    entry_points,
    launch_env,
    make_recorder,
    make_shards,
    printed_cmd,
    run,
    write_fake,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory)


@pytest.fixture
def recorder(tmp_path):
    return make_recorder(tmp_path)


# ---------------------------------------------------------------------------------------------
# --dry-run: anywhere on the command line, never passed on as an override

DRY_RUN_AT = ["first", "before config", "after config", "between overrides", "last"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", DRY_RUN_AT)
@pytest.mark.parametrize("entry", ENTRIES)
def test_dry_run_anywhere(entry, where, tmp_path, recorder):
    fake, rec = recorder
    env, entries = entry_points(tmp_path, fake)
    env["DISSECT_CHECK"] = "0"
    n_exe = 2 if entry == "slurm" else 1  # ["bash", slurm.sbatch] / [launcher]
    exe, opts = entries[entry][:n_exe], entries[entry][n_exe:]
    overrides = ["run.name=x", "optim.lr=1e-3"]
    args = [*opts, CONFIG, *overrides]
    at = {
        "first": 0,
        "before config": len(opts),
        "after config": len(opts) + 1,
        "between overrides": len(opts) + 2,
        "last": len(args),
    }[where]
    args.insert(at, "--dry-run")
    p = run([*exe, *args], 20, env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    cmd = printed_cmd(p.stdout)
    assert "--dry-run" not in cmd
    expected = [CONFIG, *(["checkpoint.resume=latest"] if entry == "slurm" else []), *overrides]
    assert cmd[cmd.index("--config") + 1 :] == expected
    assert not rec.exists()  # nothing started


# ---------------------------------------------------------------------------------------------
# refusals: one line, non-zero, nothing started


BAD_HOSTFILES = {
    "missing slots": ("node-a slots=8\nnode-b\n", "line 2: 'node-b'"),
    "misspelt slots": ("node-a slot=8\n", "line 1: 'node-a slot=8'"),
    "zero slots": ("node-a slots=0\n", "slots must be at least 1"),
    "trailing junk": ("node-a slots=8 gpus=8\n", "line 1: 'node-a slots=8 gpus=8'"),
    "duplicate host": (
        "node-a slots=8\n# again\nnode-a slots=8\n",
        "line 3: 'node-a slots=8': host 'node-a' is listed twice",
    ),
    "no hosts": ("# nothing here\n\n", "names no hosts"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BAD_HOSTFILES))
def test_malformed_hostfile_is_refused(case, tmp_path, recorder):
    fake, rec = recorder
    text, expected = BAD_HOSTFILES[case]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    p = run(
        [LAUNCH / "multi_node.sh", "deepspeed", "--hostfile", hostfile, CONFIG, "data.train=x"],
        20,
        launch_env(DEEPSPEED=str(fake)),
    )
    assert p.returncode == 2
    assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"launch/multi_node.sh: error: hostfile {hostfile} ")
    assert expected in p.stderr
    assert not rec.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_config_is_refused_before_anything_starts(entry, shards, tmp_path, recorder):
    fake, rec = recorder
    env, entries = entry_points(tmp_path, fake)
    p = run(
        [*entries[entry], CONFIG, f"data.train={shards / 'train'}", "selection.method=nope"],
        50,
        env,
        cwd=tmp_path,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "+ " not in p.stdout  # no command printed: nothing was about to start
    assert p.stderr.count("\n") == 1, p.stderr
    assert (
        "refusing to start: dissect-train: config error: selection.method must be one of"
        in p.stderr
    )
    assert not rec.exists()
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# docs/launching.md and the README's "Launch on a cluster": every launch command runs as a dry run


def launch_section() -> str:
    """docs/launching.md, then the README's launch section (its commands are tested alike)."""
    page = (ROOT / "docs" / "launching.md").read_text()
    text = (ROOT / "README.md").read_text()
    start = text.index("## Launch on a cluster")
    end = text.find("\n## ", start + 1)
    return page + "\n" + text[start : end if end > 0 else None]


def readme_commands() -> list[str]:
    text = launch_section()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [
        ln for block in blocks for ln in block.splitlines() if ln.strip() and not ln.startswith("#")
    ]


@pytest.mark.timeout(60)
def test_readme_commands_dry_run(tmp_path):
    text = launch_section()
    hosts = re.search(r"```text\n# hosts\n(.*?)```", text, flags=re.S).group(1)
    (tmp_path / "hosts").write_text(hosts)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "scontrol", "echo node-a\n")
    commands = readme_commands()
    assert len(commands) >= 10
    for line in commands:
        words = shlex.split(line, comments=True)
        env = launch_env(
            DISSECT_CHECK="0", TMPDIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}"
        )
        while "=" in words[0] and not words[0].startswith("-"):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if words[0] == "sbatch":
            opts = dict(w[2:].split("=", 1) for w in words[1 : words.index("launch/slurm.sbatch")])
            env.update(
                DRY_RUN="1",
                SLURM_JOB_ID="1",
                SLURM_SUBMIT_DIR=str(tmp_path),
                SLURM_JOB_NUM_NODES=opts.get("nodes", "2"),
                SLURM_GPUS_PER_NODE=opts.get("gpus-per-node", "8"),
            )
            args = words[words.index("launch/slurm.sbatch") + 1 :]
            cmd = ["bash", LAUNCH / "slurm.sbatch", *args]
        else:
            assert words[0].startswith("launch/"), line
            args = words[1:]
            cmd = [ROOT / words[0], "--dry-run", *args]
        p = run(cmd, 20, env, cwd=tmp_path)
        assert p.returncode == 0, f"{line}\n{p.stderr}"
        printed = printed_cmd(p.stdout)
        config_at = printed.index("--config")
        user = [a for a in args[args.index("configs/demo.yaml") :] if a != "--dry-run"]
        assert [x for x in printed[config_at + 1 :] if x != "checkpoint.resume=latest"] == user, (
            line
        )
