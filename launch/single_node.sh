#!/usr/bin/env bash
# Train on one machine with every local GPU (or NPROC CPU processes).
#
#   launch/single_node.sh [--dry-run] CONFIG [key=value ...]
#
#   NPROC=N        processes (default: one per GPU in CUDA_VISIBLE_DEVICES or `nvidia-smi -L`;
#                  2 without GPUs)
#   LAUNCHER=torchrun (default) | deepspeed
#   MASTER_PORT=P  deepspeed launcher only (default: a free port); torchrun --standalone picks one
#
# Overrides go to the trainer untouched. Before starting, the config is checked with
# `python -m pipeline.train --check` (see DISSECT_CHECK in launch/env.sh); the command that runs
# is printed first. --dry-run (anywhere on the command line) checks and prints, then exits 0
# without starting anything. The command runs as a child of this script: SIGTERM, SIGINT or
# SIGHUP here stops every rank too (see DISSECT_KILL_GRACE_S in launch/env.sh); the exit status
# is the command's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage="usage: launch/single_node.sh [--dry-run] CONFIG [key=value ...]"
dissect_take_dry_run "$@"
set -- ${DISSECT_ARGS[@]+"${DISSECT_ARGS[@]}"}
case "${1:-}" in
    "" ) dissect_die "no config given; $usage" ;;
    -h | --help ) echo "$usage"; exit 0 ;;
    -* ) dissect_die "unknown option '$1'; $usage" ;;
esac
config="$1"
shift

nproc="$(dissect_default_nproc)"
dissect_default_omp_threads "$nproc"
dissect_check_config "$config" "$@"

case "${LAUNCHER:-torchrun}" in
    torchrun)
        cmd=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$nproc"
            -m pipeline.train --config "$config" "$@")
        ;;
    deepspeed)
        port="${MASTER_PORT:-$(dissect_free_port)}"
        cmd=("$DEEPSPEED")
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != -1 ]]; then
            # --num_gpus N would make the launcher drop CUDA_VISIBLE_DEVICES and take GPUs 0..N-1
            IFS=, read -r -a gpu_ids <<<"$CUDA_VISIBLE_DEVICES"
            gpu_ids=("${gpu_ids[@]:0:$nproc}")
            cmd+=(--include "localhost:$(IFS=,; echo "${gpu_ids[*]}")")
        else
            cmd+=(--num_gpus "$nproc")
        fi
        cmd+=(--master_addr 127.0.0.1 --master_port "$port" --module pipeline.train --config "$config" "$@")
        ;;
    *) dissect_die "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" ;;
esac

dissect_print_env
dissect_print_cmd "${cmd[@]}"
[[ "$DISSECT_DRY_RUN" == 1 ]] && exit 0
rc=0
dissect_run "${cmd[@]}" || rc=$?
exit "$rc"
