#!/usr/bin/env bash
# Run a command as a child and take its whole process tree down with it.
#
#   launch/supervise.sh CMD [ARG ...]
#
# SIGTERM, SIGINT or SIGHUP stops every process under CMD (SIGTERM, then SIGKILL after
# DISSECT_KILL_GRACE_S; see launch/env.sh) and exits 128 + the signal number; when CMD exits,
# anything it left running is stopped the same way; otherwise the exit status is CMD's.
# launch/slurm.sbatch runs torchrun through this on every node: srun signals its task (this
# script) on scancel or at the time limit, and torchrun starts each rank in a session of its own,
# out of reach of a signal to torchrun's process group. single_node.sh and multi_node.sh do the
# same in-process (dissect_run in launch/env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

[[ $# -ge 1 ]] || dissect_die "no command given; usage: launch/supervise.sh CMD [ARG ...]"
rc=0
dissect_run "$@" || rc=$?
exit "$rc"
