# shellcheck shell=bash
# The launch environment in one place. Sourced by launch/single_node.sh, launch/multi_node.sh and
# launch/slurm.sbatch; not meant to be run. Every variable below keeps a value you set before
# calling a launcher (`IFNAME=ib0 launch/multi_node.sh ...`); only unset ones get the default.
#
# Timeouts, from the inside out (what ends a job when a rank dies or hangs):
#   deepspeed.timeout_s   config key (default 600 s), not set here: the bound on every collective.
#                         When a rank dies, its peers' next collective fails at once (connection
#                         reset); when a rank hangs, they fail after timeout_s. The config is its
#                         one home so a run's config.yaml records it.
#   launcher group kill   torchrun and the deepspeed launcher stop every local rank as soon as one
#                         exits non-zero (torchrun: SIGTERM, SIGKILL 30 s later), then exit non-zero.
#   srun --kill-on-bad-exit=1   (slurm.sbatch) one node's non-zero exit ends all nodes.
#   DISSECT_RDZV_TIMEOUT_S      below: how long nodes wait for each other at start-up.

# Repository root (this file lives in launch/).
DISSECT_ROOT="${DISSECT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

# The Python that runs training: the project's .venv when there is one, else python3 on PATH.
# torchrun and deepspeed are taken from the same environment (next to that python), so the
# launcher and the ranks never come from two different installs.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$DISSECT_ROOT/.venv/bin/python" ]]; then
        PYTHON="$DISSECT_ROOT/.venv/bin/python"
    else
        PYTHON="$(command -v python3 || true)"
    fi
fi
TORCHRUN="${TORCHRUN:-$(dirname "$PYTHON")/torchrun}"
DEEPSPEED="${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}"

# `python -m pipeline.train` works from any working directory (config and data paths stay
# relative to yours), also for a python without the editable install.
export PYTHONPATH="$DISSECT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Logs reach the per-node log files as they are written, not when a buffer fills.
export PYTHONUNBUFFERED=1

# No network calls from library start-up: albumentations' update check, Hugging Face hub lookups
# (open_clip's tokenizer and model configs are local), tokenizers' fork warning.
export NO_ALBUMENTATIONS_UPDATE=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# Network interface for NCCL and gloo traffic, e.g. IFNAME=ib0 or IFNAME=eth0 (NCCL also takes
# a prefix list such as "^lo,docker"). Set only when you set IFNAME: left alone, both libraries
# pick an interface themselves, which is right on most clusters and wrong on nodes with several
# networks (then ranks hang at start-up connecting over the wrong one). An NCCL_SOCKET_IFNAME or
# GLOO_SOCKET_IFNAME you export yourself is never overridden.
if [[ -n "${IFNAME:-}" ]]; then
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$IFNAME}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IFNAME}"
fi

# NCCL failures end the process instead of hanging it: the watchdog thread aborts the
# communicator and tears the process down when a collective errors or exceeds the process-group
# timeout (deepspeed.timeout_s), so the launcher sees a dead rank and stops the job.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# 0: collectives stay asynchronous (full speed); the watchdog above enforces the timeout.
# 1 makes the calling thread wait for each collective and raise a Python error on timeout
# (a readable traceback at the cost of overlap): worth it when debugging a hang.
export TORCH_NCCL_BLOCKING_WAIT="${TORCH_NCCL_BLOCKING_WAIT:-0}"
# NCCL's own log level: WARN prints why a communicator failed; INFO (very verbose) shows which
# interface and transport (IB, socket) each connection picked.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# Seconds that nodes wait for each other at start-up (torchrun rendezvous: `timeout` for the
# static --master-addr form, `join_timeout` for c10d). A node that never arrives ends the job
# after this long instead of leaving the others waiting. 900 s covers slow image pulls and
# staggered SLURM starts.
DISSECT_RDZV_TIMEOUT_S="${DISSECT_RDZV_TIMEOUT_S:-900}"

# 1: before starting anything, run `python -m pipeline.train --config CFG --check overrides...`
# (config parses, shards and val files exist) and refuse to start on an error. Set 0 only when
# the launching machine cannot see the data (a login node without the dataset mount).
DISSECT_CHECK="${DISSECT_CHECK:-1}"

# OMP_NUM_THREADS is set per launch by dissect_default_omp_threads (below): the machine's cores
# divided by the ranks on it, so ranks do not oversubscribe the CPU; torchrun alone would use 1.

# Variables the deepspeed launcher must carry to other nodes (its ssh/pdsh command line only
# exports NCCL*, PYTHON*, UCX*, MV2* and what a DS_ENV_FILE lists): multi_node.sh writes the
# ones that are set into a DS_ENV_FILE.
DISSECT_EXPORT_VARS=(OMP_NUM_THREADS PYTHONUNBUFFERED NO_ALBUMENTATIONS_UPDATE HF_HUB_OFFLINE
    TOKENIZERS_PARALLELISM NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME TORCH_NCCL_ASYNC_ERROR_HANDLING
    TORCH_NCCL_BLOCKING_WAIT NCCL_DEBUG)

# ---------------------------------------------------------------------------------------------
# helpers shared by the launchers

DISSECT_PROG="${DISSECT_PROG:-launch/$(basename "$0")}"

# One line on stderr, exit 2: nothing has been started.
dissect_die() {
    echo "$DISSECT_PROG: error: $*" >&2
    exit 2
}

# The exact command, shell-quoted so it can be pasted back into a shell.
dissect_print_cmd() {
    local out="+" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"; else out+=" $(printf '%q' "$a")"; fi
    done
    echo "$out"
}

# The launch environment that matters to the ranks, as one comment line (goes with the command).
dissect_print_env() {
    local out="# env:" v
    for v in "${DISSECT_EXPORT_VARS[@]}"; do
        [[ -n "${!v:-}" ]] && out+=" $v=$(printf '%q' "${!v}")"
    done
    echo "$out"
}

# Number of local GPUs this job may use: the entries of CUDA_VISIBLE_DEVICES when set (SLURM and
# shared machines restrict it; nvidia-smi ignores it), else what `nvidia-smi -L` lists, else 0.
dissect_count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != -1 ]]; then
        local ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
}

# Processes per node: NPROC if set, else every local GPU, else 2 CPU processes.
dissect_default_nproc() {
    if [[ -n "${NPROC:-}" ]]; then
        [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || dissect_die "NPROC must be a positive integer, got '$NPROC'"
        echo "$NPROC"
        return
    fi
    local gpus
    gpus="$(dissect_count_gpus)"
    if [[ "$gpus" -gt 0 ]]; then echo "$gpus"; else echo 2; fi
}

# Export OMP_NUM_THREADS = cores / ranks on this machine (at least 1), unless already set.
dissect_default_omp_threads() {
    local nproc="$1" cores
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        cores="$(nproc 2>/dev/null || echo 1)"
        OMP_NUM_THREADS=$((cores / nproc))
        [[ "$OMP_NUM_THREADS" -ge 1 ]] || OMP_NUM_THREADS=1
    fi
    export OMP_NUM_THREADS
}

# A free TCP port on this machine (for single-node runs that need a master port).
dissect_free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# Refuse to start unless the config parses and its paths exist: runs the trainer's --check.
# Sets DISSECT_RUN_DIR to the resolved run.dir (as the config gives it, maybe relative).
dissect_check_config() {
    local config="$1"
    shift
    DISSECT_RUN_DIR=""
    [[ -x "$PYTHON" ]] || dissect_die "no python at '$PYTHON' (set PYTHON, or create .venv: make setup)"
    [[ -f "$config" ]] || dissect_die "config file '$config' does not exist"
    [[ "$DISSECT_CHECK" == 0 ]] && return 0
    local out rc line
    out="$("$PYTHON" -m pipeline.train --config "$config" --check "$@" 2>&1)" && rc=0 || rc=$?
    if [[ "$rc" -ne 0 ]]; then
        # the trainer's one line ("dissect-train: config error: ..."), else the last line
        line="$(grep -m1 '^dissect-train:' <<<"$out" || true)"
        [[ -n "$line" ]] || line="$(grep -v '^[[:space:]]*$' <<<"$out" | tail -n1)"
        echo "$DISSECT_PROG: refusing to start: $line" >&2
        exit "$rc"
    fi
    DISSECT_RUN_DIR="$(sed -n 's/^config ok: run.dir=//p' <<<"$out" | tail -n1)"
}
