# shellcheck shell=bash
# The launch environment in one place. Sourced by launch/single_node.sh, launch/multi_node.sh,
# launch/slurm.sbatch and launch/supervise.sh; not meant to be run. Every variable below keeps a value you set before
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
#   DISSECT_KILL_GRACE_S        below: a launcher that is signalled (or whose torchrun died)
#                         stops its whole process tree, SIGKILL this long after SIGTERM.

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
case ":${PYTHONPATH:-}:" in
    *":$DISSECT_ROOT:"*) ;;  # sourced twice (launch/supervise.sh under slurm.sbatch): once is enough
    *) export PYTHONPATH="$DISSECT_ROOT${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

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

# Seconds between the SIGTERM and the SIGKILL with which a launcher stops its job. A launcher runs
# torchrun / the deepspeed launcher / srun as a child and, when it is signalled (SIGTERM, SIGINT,
# SIGHUP) or exits with processes left (a launcher command that died abnormally), sends SIGTERM to
# its whole process tree (every rank, though torchrun starts each in a session of its own) and
# SIGKILL to what is still alive this long after. A signalled launcher exits 128 + the signal.
DISSECT_KILL_GRACE_S="${DISSECT_KILL_GRACE_S:-10}"

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

# --dry-run may stand anywhere on a launcher's command line (it is never a key=value override):
# sets DISSECT_DRY_RUN (1 when given, else 0) and DISSECT_ARGS (the arguments without it).
#   dissect_take_dry_run "$@"; set -- ${DISSECT_ARGS[@]+"${DISSECT_ARGS[@]}"}
dissect_take_dry_run() {
    DISSECT_DRY_RUN=0
    DISSECT_ARGS=()
    local a
    for a in "$@"; do
        if [[ "$a" == --dry-run ]]; then DISSECT_DRY_RUN=1; else DISSECT_ARGS+=("$a"); fi
    done
}

# One line on stderr, exit 2: nothing has been started.
dissect_die() {
    echo "$DISSECT_PROG: error: $*" >&2
    exit 2
}

[[ "$DISSECT_KILL_GRACE_S" =~ ^[0-9]+$ ]] ||
    dissect_die "DISSECT_KILL_GRACE_S must be a whole number of seconds, got '$DISSECT_KILL_GRACE_S'"

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

# ---------------------------------------------------------------------------------------------
# running the launcher command: its whole process tree goes down with the launcher

# The processes among the given PIDs and all their descendants that are alive (zombies count as
# dead), one per line, without this shell itself. The tree is walked by parent PID: torchrun
# starts every rank in a session (and process group) of its own, which a group kill misses. The
# subshell running this walk, and its ps and awk, are left out: call it as $(dissect_tree PID...).
dissect_tree() {
    local walker="$BASHPID"  # here, not in the awk arguments: each pipeline part is a subshell
    ps -e -o pid=,ppid=,stat= | awk -v roots="$*" -v self="$$" -v walker="$walker" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1 }
        $1 != walker && $3 !~ /^Z/ { parent[$1] = $2 }
        END {
            do {
                grown = 0
                for (p in parent) if (!(p in want) && (parent[p] in want)) { want[p] = 1; grown = 1 }
            } while (grown)
            for (p in want) if ((p in parent) && p != self) print p
        }'
}

# dissect_stop_tree WHY PID...: SIGTERM to those processes and all their descendants, SIGKILL to
# what is still alive DISSECT_KILL_GRACE_S seconds later; one line on stderr saying WHY. Returns
# at once, silently, when none is alive.
dissect_stop_tree() {
    local why="$1" pids polls
    shift
    pids="$(dissect_tree "$@")"
    [[ -n "$pids" ]] || return 0
    echo "$DISSECT_PROG: $why: stopping $(wc -w <<<"$pids") processes (SIGTERM; SIGKILL after ${DISSECT_KILL_GRACE_S} s)" >&2
    # shellcheck disable=SC2086  # one PID per word
    kill -TERM $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -CONT $pids 2>/dev/null || true  # a stopped process acts on SIGTERM only once continued
    for ((polls = DISSECT_KILL_GRACE_S * 5; polls > 0; polls--)); do
        sleep 0.2
        # shellcheck disable=SC2086
        pids="$(dissect_tree $pids "$@")"  # the ones still alive, and any new descendants
        [[ -n "$pids" ]] || return 0
    done
    echo "$DISSECT_PROG: still alive after ${DISSECT_KILL_GRACE_S} s: SIGKILL to $(wc -w <<<"$pids") processes" >&2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for ((polls = 20; polls > 0 && ${#pids} > 0; polls--)); do  # SIGKILL is not instant either
        sleep 0.1
        # shellcheck disable=SC2086
        pids="$(dissect_tree $pids)"
    done
}

dissect_on_signal() {
    trap '' HUP INT TERM  # a second signal does not cut the stopping short
    # this shell's own `sleep` is not part of the job (and would be counted)
    [[ -z "${DISSECT_NAP:-}" ]] || { kill "$DISSECT_NAP" && wait "$DISSECT_NAP"; } 2>/dev/null || true
    # shellcheck disable=SC2086
    dissect_stop_tree "SIG$1" "$$" $DISSECT_SEEN
    exit $((128 + $2))
}

# dissect_run CMD...: run the launcher command as a child of this shell and return its exit
# status. SIGTERM, SIGINT or SIGHUP to this shell stops the command's whole process tree
# (dissect_stop_tree) and exits 128 + the signal number; on any exit, whatever is left of the
# tree (ranks of a launcher that died abnormally) is stopped the same way. The tree is looked at
# every second while the command runs: orphaned ranks are re-parented away from this shell, and
# that last look is how they are still found. Other traps (slurm.sbatch's USR1) keep working.
# (A `sleep 0.2` loop rather than one `wait` for the command: bash runs a trap only between
# commands, and a `wait` for the command alone would leave no moment to look at the tree.)
dissect_run() {
    DISSECT_SEEN="" DISSECT_NAP=""
    trap 'dissect_on_signal HUP 1' HUP
    trap 'dissect_on_signal INT 2' INT
    trap 'dissect_on_signal TERM 15' TERM
    # shellcheck disable=SC2154,SC2086
    trap 'dissect_stop_tree "exiting with processes left" "$$" $DISSECT_SEEN' EXIT
    # <&0: keep stdin (a background command would get /dev/null)
    "$@" <&0 &
    local child=$! rc=0 polls=0
    while kill -0 "$child" 2>/dev/null; do
        ((polls++ % 5)) || DISSECT_SEEN="$(dissect_tree "$child")"  # every 5th 0.2 s poll
        sleep 0.2 &
        DISSECT_NAP=$!
        while kill -0 "$DISSECT_NAP" 2>/dev/null; do
            wait "$DISSECT_NAP" || true  # a trapped signal ends the wait at once; its trap runs here
        done
    done
    DISSECT_NAP=""
    wait "$child" || rc=$?  # bash keeps the exit status of a reaped child for this
    return "$rc"
}
