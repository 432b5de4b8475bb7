#!/usr/bin/env bash
# Train on several machines, with the deepspeed launcher (hostfile + ssh) or torchrun (one
# command per node, no ssh needed).
#
#   launch/multi_node.sh [--dry-run] deepspeed --hostfile FILE [--master-addr ADDR]
#       [--master-port PORT] [--launcher pdsh|openmpi|mvapich|impi|slurm]
#       [--no-ssh --node-rank R] CONFIG [key=value ...]
#     Run once, on the first host. FILE has one "HOST slots=N" line per machine (N processes,
#     one per GPU; blank lines and # comments are ignored). The launcher reaches the other hosts
#     by passwordless ssh (pdsh). --master-addr defaults to the first host in FILE, --master-port
#     to 29500. A hostfile naming only this machine (localhost) runs here with no ssh at all.
#     --no-ssh --node-rank R: no ssh; run the same command on every host with its own R.
#
#   launch/multi_node.sh [--dry-run] torchrun --nnodes N [--nproc-per-node G]
#       (--node-rank R --master-addr ADDR [--master-port PORT]
#        | --rdzv-endpoint HOST:PORT [--rdzv-id ID]) CONFIG [key=value ...]
#     Run the same command on every node (no ssh between nodes). Static form: each node gives
#     its rank R (0..N-1), and node 0's address. Rendezvous form (c10d): nodes find each other
#     through HOST:PORT (a port on one of the nodes) and get ranks in arrival order; ID names
#     the job (default "dissect"; use a distinct one for each job sharing an endpoint).
#     G defaults to the local GPU count (NPROC without GPUs, default 2).
#
# Another number of machines or GPUs than the checkpoint's: restart with checkpoint.resume=latest
# on the new hostfile / --nnodes / --nproc-per-node; the first start converts the checkpoint to
# DeepSpeed's universal format once and reshards the selection state (one log line says so).
# data.batch_size is per rank: the global batch follows the rank count.
#
# Options take "--opt VALUE" or "--opt=VALUE", with - or _ (--master_addr works too). The first
# argument that is not an option is the config; everything after it goes to the trainer
# untouched. The hostfile and config are checked before anything starts (see launch/env.sh),
# and the exact command is printed first. --dry-run (anywhere on the command line) checks, prints
# and exits 0. The command runs as a child of this script: SIGTERM, SIGINT or SIGHUP here stops
# every local rank too (see DISSECT_KILL_GRACE_S in launch/env.sh); the exit status is the
# command's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage="usage: launch/multi_node.sh [--dry-run] {deepspeed --hostfile FILE | torchrun --nnodes N ...} CONFIG [key=value ...] (see the top of launch/multi_node.sh)"

dissect_take_dry_run "$@"
set -- ${DISSECT_ARGS[@]+"${DISSECT_ARGS[@]}"}
mode="${1:-}"
case "$mode" in
    deepspeed | torchrun) shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") dissect_die "no launcher given; $usage" ;;
    *) dissect_die "the first argument must be deepspeed or torchrun, got '$mode'; $usage" ;;
esac

# --- options ----------------------------------------------------------------------------------
hostfile="" master_addr="" master_port="" launcher="" no_ssh=0 node_rank=""
nnodes="" nproc_per_node="" rdzv_endpoint="" rdzv_id=""
while [[ $# -gt 0 ]]; do
    arg="$1"
    case "$arg" in
        --) shift; break ;;
        --no-ssh | --no_ssh) no_ssh=1; shift; continue ;;
        --*=*) opt="${arg%%=*}"; val="${arg#*=}"; shift ;;
        --*)
            opt="$arg"
            [[ $# -ge 2 ]] || dissect_die "option $opt needs a value"
            val="$2"
            shift 2
            ;;
        *) break ;;
    esac
    opt="${opt//_/-}"
    case "$mode:$opt" in
        deepspeed:--hostfile) hostfile="$val" ;;
        deepspeed:--launcher) launcher="$val" ;;
        *:--master-addr) master_addr="$val" ;;
        *:--master-port) master_port="$val" ;;
        *:--node-rank) node_rank="$val" ;;
        torchrun:--nnodes) nnodes="$val" ;;
        torchrun:--nproc-per-node) nproc_per_node="$val" ;;
        torchrun:--rdzv-endpoint) rdzv_endpoint="$val" ;;
        torchrun:--rdzv-id) rdzv_id="$val" ;;
        *) dissect_die "unknown option '$opt' for $mode; $usage" ;;
    esac
done
[[ $# -ge 1 ]] || dissect_die "no config given; $usage"
config="$1"
shift

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_port() { is_uint "$1" && [[ "$1" -ge 1 && "$1" -le 65535 ]]; }
[[ -z "$master_port" ]] || is_port "$master_port" || dissect_die "--master-port must be a port number (1-65535), got '$master_port'"
[[ -z "$node_rank" ]] || is_uint "$node_rank" || dissect_die "--node-rank must be a non-negative integer, got '$node_rank'"

# Hostfile: "HOST slots=N" per line, N >= 1, each host once. Checked here, before anything
# starts, with the line named (the deepspeed launcher would accept "host slots=8 junk" and
# fail later on others).
declare -a hosts=()
declare -a slots=()
validate_hostfile() {
    local file="$1" n=0 line host count h
    [[ -f "$file" ]] || dissect_die "hostfile '$file' does not exist"
    while IFS= read -r line || [[ -n "$line" ]]; do
        n=$((n + 1))
        [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]] && continue
        if [[ ! "$line" =~ ^[[:space:]]*([^[:space:]#=]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
            dissect_die "hostfile $file line $n: '$line': expected 'HOST slots=N'"
        fi
        host="${BASH_REMATCH[1]}"
        count="${BASH_REMATCH[2]}"
        [[ "$count" -ge 1 ]] || dissect_die "hostfile $file line $n: '$line': slots must be at least 1"
        for h in "${hosts[@]}"; do
            [[ "$h" != "$host" ]] || dissect_die "hostfile $file line $n: '$line': host '$host' is listed twice"
        done
        hosts+=("$host")
        slots+=("$count")
    done <"$file"
    [[ ${#hosts[@]} -gt 0 ]] || dissect_die "hostfile $file names no hosts (expected 'HOST slots=N' lines)"
}

is_this_machine() {
    case "$1" in
        localhost | 127.0.0.1 | ::1 | "$(hostname)" | "$(hostname -f 2>/dev/null || hostname)") return 0 ;;
        *) return 1 ;;
    esac
}

# --- build the command ------------------------------------------------------------------------
if [[ "$mode" == deepspeed ]]; then
    [[ -n "$hostfile" ]] || dissect_die "deepspeed needs --hostfile FILE ('HOST slots=N' lines); $usage"
    validate_hostfile "$hostfile"
    if [[ "$no_ssh" == 1 ]]; then
        [[ -n "$node_rank" ]] || dissect_die "--no-ssh needs --node-rank R (this host's line in the hostfile, from 0)"
        [[ "$node_rank" -lt ${#hosts[@]} ]] || dissect_die "--node-rank $node_rank, but hostfile $hostfile has ${#hosts[@]} hosts"
    else
        [[ -z "$node_rank" ]] || dissect_die "--node-rank only goes with --no-ssh"
    fi
    if [[ -z "$master_addr" && ${#hosts[@]} -gt 1 ]]; then
        case "${hosts[0]}" in
            localhost | 127.* | ::1) dissect_die "the first host '${hosts[0]}' is a different machine on each host: give --master-addr (its address as the others see it)" ;;
        esac
    fi
    master_addr="${master_addr:-${hosts[0]}}"
    master_port="${master_port:-29500}"
    local_slots="${slots[${node_rank:-0}]}"
    dissect_default_omp_threads "$local_slots"
    dissect_check_config "$config" "$@"

    cmd=("$DEEPSPEED" --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port")
    [[ -z "$launcher" ]] || cmd+=(--launcher "$launcher")
    if [[ "$no_ssh" == 1 ]]; then
        cmd+=(--no_ssh --node_rank "$node_rank")
    elif [[ ${#hosts[@]} -eq 1 ]] && is_this_machine "${hosts[0]}"; then
        cmd+=(--no_ssh_check)  # one host, this one: the launcher runs locally, ssh is not needed
    else
        # one host that is not this one: the launcher would run it here unless forced over ssh
        [[ ${#hosts[@]} -gt 1 ]] || cmd+=(--force_multi)
        # the launcher's ssh/pdsh command line carries only NCCL*/PYTHON* variables; a
        # DS_ENV_FILE (read here, on the launching host) carries the rest of launch/env.sh
        if [[ -z "${DS_ENV_FILE:-}" ]]; then
            env_file="$(mktemp "${TMPDIR:-/tmp}/dissect-ds-env.XXXXXX")"
            for v in "${DISSECT_EXPORT_VARS[@]}"; do
                [[ -z "${!v:-}" ]] || echo "$v=${!v}" >>"$env_file"
            done
            cmd=(env "DS_ENV_FILE=$env_file" "${cmd[@]}")
        fi
    fi
    cmd+=(--module pipeline.train --config "$config" "$@")
else
    [[ -n "$nnodes" ]] || dissect_die "torchrun needs --nnodes N; $usage"
    [[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || dissect_die "--nnodes must be a positive integer, got '$nnodes'"
    nproc_per_node="${nproc_per_node:-$(dissect_default_nproc)}"
    [[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]] || dissect_die "--nproc-per-node must be a positive integer, got '$nproc_per_node'"
    cmd=("$TORCHRUN" --nnodes "$nnodes" --nproc-per-node "$nproc_per_node" --max-restarts 0)
    if [[ -n "$rdzv_endpoint" ]]; then
        [[ -z "$master_addr$node_rank" ]] || dissect_die "give either --rdzv-endpoint (c10d rendezvous) or --node-rank/--master-addr, not both"
        [[ "$rdzv_endpoint" =~ ^[^[:space:]]+:[0-9]+$ ]] || dissect_die "--rdzv-endpoint must be HOST:PORT, got '$rdzv_endpoint'"
        is_port "${rdzv_endpoint##*:}" || dissect_die "--rdzv-endpoint port must be 1-65535, got '${rdzv_endpoint##*:}'"
        cmd+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "${rdzv_id:-dissect}"
            --rdzv-conf "join_timeout=$DISSECT_RDZV_TIMEOUT_S")
    else
        [[ -z "$rdzv_id" ]] || dissect_die "--rdzv-id goes with --rdzv-endpoint"
        [[ -n "$node_rank" ]] || dissect_die "torchrun needs --node-rank R (0..N-1) with --master-addr, or --rdzv-endpoint HOST:PORT"
        [[ -n "$master_addr" ]] || dissect_die "torchrun needs --master-addr (node 0's address) with --node-rank"
        [[ "$node_rank" -lt "$nnodes" ]] || dissect_die "--node-rank $node_rank must be below --nnodes $nnodes"
        cmd+=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "${master_port:-29500}"
            --rdzv-conf "timeout=$DISSECT_RDZV_TIMEOUT_S")
    fi
    dissect_default_omp_threads "$nproc_per_node"
    dissect_check_config "$config" "$@"
    cmd+=(-m pipeline.train --config "$config" "$@")
fi

dissect_print_env
dissect_print_cmd "${cmd[@]}"
[[ "$DISSECT_DRY_RUN" == 1 ]] && exit 0
rc=0
dissect_run "${cmd[@]}" || rc=$?
exit "$rc"
