#!/usr/bin/env bash
# The workflow on a real SLURM: start a one-node SLURM cluster on this machine (munged,
# slurmctld, slurmd; state, logs and munge socket under a temporary folder, free ports; its
# slurm.conf at /etc/slurm/slurm.conf, where the job steps' srun finds it: the SLURM plugin
# removes SLURM_CONF from their environment), build the two runs of the tiny study of
# tests/cluster/tiny.yaml (tests/cluster/tiny_study.py writes them) through
# `--profile profiles/slurm` (made fit for a small node
# without GPUs by tests/cluster/make_profile.py, which prints what it changes: no GPU, small
# memory, squeue for the status), build it again locally, and compare the outputs
# (tests/cluster/compare_outputs.py). Tears everything down on exit; exits non-zero on any
# failure. It refuses to run where a SLURM config exists already (a real cluster's).
#
# Needs root (it installs slurmctld, slurmd, slurm-client and munge with apt-get when they
# are missing) and .venv (`make setup`). Takes 2 to 4 minutes on 2 cores.
#   usage: tests/cluster/run_slurm.sh        (KEEP=1 keeps the temporary folder)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
SNAKEMAKE=$VENV/bin/snakemake
STUDY=tiny
N_RUNS=2
START=$SECONDS

log() { printf '[run_slurm %3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

[[ $(id -u) -eq 0 ]] || die "needs root: it installs packages and starts munged, slurmctld, slurmd"
[[ -x $SNAKEMAKE ]] || die "no $SNAKEMAKE: run 'make setup' first"

# --- packages -------------------------------------------------------------------------
missing=()
command -v munged >/dev/null || missing+=(munge)
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- a temporary cluster ----------------------------------------------------------------
WORK=$(mktemp -d /tmp/paramdyn-slurm.XXXXXX)
mkdir -p "$WORK"/{munge,state,spool,log,profile}
chmod 700 "$WORK/munge"
PIDS=()
CONF=/etc/slurm/slurm.conf
MARK="# paramdyn test cluster (tests/cluster/run_slurm.sh)"
WROTE_CONF=0
CLUSTER_UP=0
CHILD=""

# long commands run in the background, so that a signal reaches the trap at once
run() {
  "$@" &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}

cleanup() {
  local rc=$?
  set +e
  if [[ -n $CHILD ]]; then
    kill "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
  fi
  if ((CLUSTER_UP)); then
    squeue -h -o %A 2>/dev/null | xargs -r scancel --quiet 2>/dev/null
    for _ in $(seq 30); do
      [[ -z $(squeue -h -t pending,running,completing 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  if ((rc != 0)); then
    for f in "$WORK"/log/*.log; do
      [[ -f $f ]] && { echo "--- tail of $f" && tail -n 25 "$f"; } >&2
    done
    find "$WORK/slurm/.snakemake/slurm_logs" -name '*.log' -print0 2>/dev/null |
      while IFS= read -r -d '' f; do { echo "--- tail of $f" && tail -n 25 "$f"; } >&2; done
  fi
  # only the daemons this script started, newest first
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[i]}" 2>/dev/null && wait "${PIDS[i]}" 2>/dev/null
  done
  ((WROTE_CONF)) && rm -f "$CONF"
  if [[ ${KEEP:-0} == 1 ]]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  if ((rc == 0)); then log "PASSED in $((SECONDS - START)) s"; else log "exit $rc"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HOST=$(hostname -s)
NODE_LINE=$(slurmd -C | sed -n 1p) # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
[[ $NODE_LINE == "NodeName=$HOST "* ]] || die "unexpected 'slurmd -C' output: $NODE_LINE"
CPUS=$(nproc)
read -r CTLD_PORT SLURMD_PORT < <(
  "$PY" -c 'import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))'
)
if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
  die "$CONF exists: this machine has a SLURM of its own, which this test would replace"
fi
mkdir -p "$(dirname "$CONF")"
WROTE_CONF=1
sed -e "s|@MARK@|$MARK|" -e "s|@WORK@|$WORK|g" -e "s|@HOST@|$HOST|g" -e "s|@NODE_LINE@|$NODE_LINE|" \
  -e "s|@CTLD_PORT@|$CTLD_PORT|" -e "s|@SLURMD_PORT@|$SLURMD_PORT|" \
  "$REPO/tests/cluster/slurm.conf.in" >"$CONF"
log "SLURM config $CONF: $NODE_LINE, ports $CTLD_PORT $SLURMD_PORT"

head -c 1024 /dev/urandom >"$WORK/munge/munge.key"
chmod 400 "$WORK/munge/munge.key"
munged --foreground --force --socket="$WORK/munge/munge.socket" \
  --key-file="$WORK/munge/munge.key" --pid-file="$WORK/munge/munged.pid" \
  --seed-file="$WORK/munge/munged.seed" --log-file="$WORK/log/munged.log" \
  >"$WORK/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
  munge -S "$WORK/munge/munge.socket" -n 2>/dev/null |
    unmunge -S "$WORK/munge/munge.socket" >/dev/null 2>&1 && break
  sleep 0.2
done
munge -S "$WORK/munge/munge.socket" -n | unmunge -S "$WORK/munge/munge.socket" >/dev/null ||
  die "munged does not answer"

CLUSTER_UP=1
slurmctld -D -c -i >"$WORK/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D >"$WORK/log/slurmd.out" 2>&1 &
PIDS+=($!)
state=""
for _ in $(seq 120); do
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
  case $state in
  idle) break ;;
  down* | drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
[[ $state == idle ]] || die "node $HOST is '${state:-not registered}', not idle"
out=$(timeout 60 srun --quiet -N1 -n1 hostname) || die "srun does not run a job"
[[ $out == "$HOST"* ]] || die "srun ran on '$out'"
log "SLURM is up: node $HOST idle, srun works"

# --- the study, through SLURM and locally ------------------------------------------------
"$PY" "$REPO/tests/cluster/make_profile.py" "$REPO" "$WORK/profile" "$CPUS"
CONFIG=$WORK/tiny.yaml # the tiny study's two runs
"$PY" "$REPO/tests/cluster/tiny_study.py" "$CONFIG"
common=(--snakefile "$REPO/Snakefile" --configfile "$CONFIG" --workflow-profile none)

t0=$SECONDS
run timeout 1200 "$SNAKEMAKE" --profile "$WORK/profile" "${common[@]}" --directory "$WORK/slurm" \
  >"$WORK/log/snakemake-slurm.log" 2>&1 || {
  tail -n 60 "$WORK/log/snakemake-slurm.log" >&2
  die "the SLURM run failed (log above)"
}
log "SLURM run done in $((SECONDS - t0)) s"

# every job but the download went through sbatch: 2 train jobs, one group of distances
submitted=$(grep -o 'submitted with SLURM jobid [0-9]* (log: [^)]*)' \
  "$WORK/log/snakemake-slurm.log" || true)
count() { grep -c "/slurm_logs/$1" <<<"$submitted" || true; }
log "SLURM jobs: $(wc -l <<<"$submitted") (train $(count rule_train/)," \
  "distances groups $(count group_distances_), prepare groups $(count group_prepare_))"
[[ $(count rule_train/) -eq $N_RUNS ]] || die "expected $N_RUNS train jobs in SLURM"
[[ $(count group_distances_) -eq 1 ]] || die "expected the distances in one group job"
[[ $(count rule_distances/) -eq 0 ]] || die "distances jobs were submitted one by one"
local_jobs=$(grep -oP '^localrule \K\w+' "$WORK/log/snakemake-slurm.log" |
  grep -vxE 'all|download_dataset' || true)
[[ -z $local_jobs ]] || die "jobs ran on the submit host, not in SLURM: $local_jobs"
grep -q "Nothing to be done" < <(
  "$SNAKEMAKE" --profile "$WORK/profile" "${common[@]}" --directory "$WORK/slurm" -n 2>&1
) || die "a second SLURM invocation still has work to do"

t0=$SECONDS
run timeout 1200 "$SNAKEMAKE" "${common[@]}" --directory "$WORK/local" --cores "$CPUS" \
  >"$WORK/log/snakemake-local.log" 2>&1 || {
  tail -n 60 "$WORK/log/snakemake-local.log" >&2
  die "the local run failed (log above)"
}
log "local run done in $((SECONDS - t0)) s"

"$PY" "$REPO/tests/cluster/compare_outputs.py" "$WORK/local" "$WORK/slurm" "$STUDY" ||
  die "the SLURM outputs differ from the local ones"
