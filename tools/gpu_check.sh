#!/usr/bin/env bash
# GPU checks in one go: environment, the CUDA tests, the benchmarks on the GPU (side by side with the official code
# when a checkout is given), the whole test suite and every notebook with a GPU present.
#
#   bash tools/gpu_check.sh OUT_DIR [OFFICIAL_CHECKOUT] [SECONDS]
#
# Writes at most 8 files to OUT_DIR: env.txt, test_cuda.log, bench_cuda.json, bench_extra.log, pytest_all.log,
# nbdev_test.log, bench.log (the benchmarks' stderr) and summary.txt. The benchmarks time our model eager and
# replayed from CUDA graphs (--cuda-graphs), and the official model as it ships (eager); `all` includes a short
# epoch (1024 training queries, val evaluation of 500) as three processes: ours eager, ours graphed, official.
# Each step has its own time limit and the whole run stops starting new steps when SECONDS (default 540) are
# nearly spent, so a slow step never loses the others.
set -u
OUT=${1:?usage: bash tools/gpu_check.sh OUT_DIR [OFFICIAL_CHECKOUT] [SECONDS]}
OFFICIAL=${2:-}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[ -n "$OFFICIAL" ] && OFFICIAL=$(cd "$OFFICIAL" && pwd)
cd "$(dirname "$0")/.."   # the repository root
BUDGET=${3:-540}
[ -x .venv/bin/python ] && V=.venv/bin/ || V=   # the `make install` venv if there is one
PY=${PY:-${V}python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: a dry run of this script on a machine without a GPU
NBDEV_TEST=${NBDEV_TEST:-${V}nbdev_test}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step NAME LIMIT LOG cmd...: run with a time limit (never more than what is left), note rc and seconds in summary.txt
step() {
  local name=$1 lim=$2 log=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt 20 ]; then echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"; return; fi
  [ "$lim" -gt "$((l - 10))" ] && lim=$((l - 10))
  local t=$(date +%s)
  timeout --kill-after=5 "$lim" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t ))s (limit ${lim}s)" | tee -a "$OUT/summary.txt"
}
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"   # pytest-xdist, if installed
OFF=(); [ -n "$OFFICIAL" ] && OFF=(--compare-official "$OFFICIAL")

{ date -u; nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.is_available() and torch.cuda.get_device_name(0))"; nproc; } >"$OUT/env.txt" 2>&1

step test_cuda 150 test_cuda.log $PY -m pytest tests/test_cuda.py -v -rs
step bench_all 240 bench.log $PY -m videolights.bench all --device "$DEVICE" --cuda-graphs "${OFF[@]}" --json "$OUT/bench_cuda.json"
set -f   # no globbing: "[75,75]" below is an argument, not a pattern
for args in "train-step" "infer" "train-step --cuda-graphs --v_range [75,75]" "infer --cuda-graphs --v_range [75,75]" \
            "train-step --cuda-graphs --amp bf16" "infer --cuda-graphs --amp bf16" "train-step --cuda-graphs --batch 128" \
            "train-step --v_range [75,75]" "infer --v_range [75,75]"; do   # eager and graphed, by priority
  echo "### bench $args" >>"$OUT/bench_extra.log"
  step "bench $args" 60 bench_extra.log $PY -m videolights.bench $args --device "$DEVICE" "${OFF[@]}"
done
# the whole suite and every notebook (GPU cells included), side by side (CPU-bound; device 'auto' picks the GPU)
step pytest_all 200 pytest_all.log env OMP_NUM_THREADS=1 $PY -m pytest tests -q -rfE --tb=short $XDIST -p no:cacheprovider &
step nbdev_test 200 nbdev_test.log env OMP_NUM_THREADS=1 $NBDEV_TEST --n_workers 8 --timing --flags cuda &
wait
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
