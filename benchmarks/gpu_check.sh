#!/usr/bin/env bash
# GPU readiness, in one call of under 8 minutes on a machine with an NVIDIA GPU:
#
#   1. the training benchmarks on CUDA, fp32 and bf16 (bench_train_lenet, bench_train_resnet18,
#      bench_train_overhead_lenet, bench_train_overhead_resnet18);
#   2. training throughput (images/s) of LeNet-5 and ResNet-18 on CIFAR-size data
#      (benchmarks/gpu_throughput.py);
#   3. the tiny study (tests/cluster/tiny.yaml: 8 runs, branches, features, claims) with
#      `device: cuda` through the real snakemake CLI with `--resources gpu=1`, every
#      training run on CUDA;
#   4. its two-run form (tests/cluster/tiny_study.py) with `deterministic: true`, trained
#      twice (`--until train`): checkpoints identical.
#
#   benchmarks/gpu_check.sh            (from anywhere; logs in results/gpu_check/)
#
# About 7 minutes on one H200-class GPU (estimated: no GPU was lent when it was written);
# GPU_CHECK_SECONDS (default 470) bounds the whole script: a check that would start later
# is reported as not run.
#
# It runs `make setup` first (nothing to do when .venv is up to date). On a machine whose
# Python already has every dependency (and no internet), set PARAMDYN_PYTHON to it: setup
# is skipped and src/ goes on PYTHONPATH. Without an NVIDIA GPU it changes nothing and exits
# with status 77 (skipped), saying so. Each check runs under its own time limit; the summary
# lists each PASS or FAIL, and the exit status is 1 when one failed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
LOGS=${GPU_CHECK_LOGS:-$REPO/results/gpu_check}
BUDGET=${GPU_CHECK_SECONDS:-470} # the whole script's: a check never runs past it
START=$SECONDS

say() { printf '== gpu_check [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

# --- the GPU, before anything is installed or written --------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
	say "SKIPPED: no NVIDIA GPU on this machine (nvidia-smi is missing or lists no GPU)."
	say "Run this script on a machine with an NVIDIA GPU; nothing was run or written."
	exit 77
fi
nvidia-smi -L

if [[ -n ${PARAMDYN_PYTHON:-} ]]; then
	PY=$PARAMDYN_PYTHON
	export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
else
	make --no-print-directory setup
	PY=$REPO/.venv/bin/python
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
	say "FAIL: nvidia-smi lists a GPU, but torch cannot use it (a CPU-only torch build?):"
	"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
	exit 1
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")'

mkdir -p "$LOGS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/paramdyn-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export REPO PY WORK
declare -a SUMMARY=()
FAILED=0

# check NAME SECONDS COMMAND...: run COMMAND (a program or a function of this script) in a
# bash of its own with errexit, under a time limit that ends its whole process group, its
# output in $LOGS/NAME.log; show the telling lines, record PASS or FAIL; never stop here.
check() {
	local name=$1 limit=$2 rc=0 why="" left=$((BUDGET - (SECONDS - START)))
	shift 2
	if ((left < 15)); then
		SUMMARY+=("FAIL  $name (not run: the ${BUDGET}s budget is spent)")
		FAILED=1
		return 0
	fi
	((limit <= left)) || limit=$left
	say "$name (limit ${limit}s)"
	timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' "$name" "$@" \
		>"$LOGS/$name.log" 2>&1 || rc=$?
	grep -E 'ratio|images/s|identical|differ|device |Error|error' "$LOGS/$name.log" |
		tail -n 12 || true
	if ((rc == 0)); then
		SUMMARY+=("PASS  $name")
	else
		if ((rc == 124 || rc == 137)); then why=", over its time limit"; fi
		SUMMARY+=("FAIL  $name (exit $rc$why: $LOGS/$name.log)")
		FAILED=1
		tail -n 20 "$LOGS/$name.log"
	fi
}

# --- 1. the training benchmarks on CUDA ------------------------------------------------------
bench() { # bench PRECISION FILE [ENV=VALUE ...]
	local precision=$1 file=$2
	shift 2
	env BENCH_DEVICE=cuda BENCH_PRECISION="$precision" "$@" "$PY" "benchmarks/$file"
}
export -f bench
for precision in fp32 bf16; do
	snap=$([[ $precision == fp32 ]] && echo 1 || echo 0) # the snapshot's cost: once
	check "bench_train_lenet_$precision" 90 bench "$precision" bench_train_lenet.py
	check "bench_train_resnet18_$precision" 120 bench "$precision" bench_train_resnet18.py \
		BENCH_EPOCHS=2 BENCH_TRAIN_IMAGES=5000
	check "bench_train_overhead_lenet_$precision" 90 bench "$precision" \
		bench_train_overhead_lenet.py BENCH_ROUNDS=5 BENCH_SNAPSHOT="$snap"
	check "bench_train_overhead_resnet18_$precision" 120 bench "$precision" \
		bench_train_overhead_resnet18.py BENCH_ROUNDS=3 BENCH_SNAPSHOT=0 \
		BENCH_EPOCHS=2 BENCH_TRAIN_IMAGES=5000
done

# --- 2. images/s on CIFAR-size data ----------------------------------------------------------
check throughput 120 "$PY" benchmarks/gpu_throughput.py --device cuda

# --- 3. a tiny study through the real snakemake CLI on the GPU ------------------------------
study_config() { # study_config DIR FORM DETERMINISTIC: the tiny study (full|two_runs) on CUDA
	mkdir -p "$1"
	"$PY" - "$1/tiny.yaml" "$2" "$3" <<-'EOF'
		import sys, yaml
		sys.path.insert(0, "tests/cluster")
		import tiny_study
		cfg = tiny_study.load() if sys.argv[2] == "full" else tiny_study.two_runs()
		cfg.update(device="cuda", deterministic=sys.argv[3] == "true")
		open(sys.argv[1], "w").write(yaml.safe_dump(cfg))
	EOF
}
snakemake_in() { # snakemake_in DIR ARGS...: under the directory lock, as make demo runs it
	local dir=$1
	shift
	"$PY" -m paramdyn.runlock -- "$PY" -m snakemake -s "$REPO/Snakefile" --directory "$dir" \
		--configfile "$dir/tiny.yaml" --cores 8 --resources gpu=1 "$@"
}
on_cuda() { # every run.json of the study says it trained on CUDA
	"$PY" - "$1" <<-'EOF'
		import json, sys
		from pathlib import Path
		runs = sorted(Path(sys.argv[1], "results", "tiny", "runs").glob("*/run.json"))
		devices = {p.parent.name: json.loads(p.read_text())["execution"]["device"] for p in runs}
		print("\n".join(f"{k}: device {v}" for k, v in devices.items()))
		sys.exit(0 if runs and all(v.startswith("cuda") for v in devices.values()) else 1)
	EOF
}
study() {
	study_config "$WORK/study" full false
	snakemake_in "$WORK/study" && on_cuda "$WORK/study"
}
export -f study_config snakemake_in on_cuda study
check study_cuda 240 study

# --- 4. deterministic: the same training twice, bit for bit ---------------------------------
deterministic() {
	for i in 1 2; do
		study_config "$WORK/det$i" two_runs true
		snakemake_in "$WORK/det$i" --until train || return 1
	done
	on_cuda "$WORK/det1"
	"$PY" - "$WORK/det1" "$WORK/det2" <<-'EOF'
		import sys
		from pathlib import Path
		a, b = (Path(d, "results", "tiny", "runs") for d in sys.argv[1:3])
		files = sorted(p.relative_to(a) for p in a.glob("*/checkpoints/*.safetensors"))
		assert files, "no checkpoints"
		assert files == sorted(p.relative_to(b) for p in b.glob("*/checkpoints/*.safetensors"))
		differ = [str(f) for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
		print(f"{len(files) - len(differ)} of {len(files)} checkpoints identical", *differ)
		sys.exit(1 if differ else 0)
	EOF
}
export -f deterministic
check deterministic_twice 180 deterministic

say "summary (logs in $LOGS):"
printf '  %s\n' "${SUMMARY[@]}"
exit "$FAILED"
