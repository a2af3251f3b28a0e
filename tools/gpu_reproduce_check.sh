#!/usr/bin/env bash
# One row of `videolights reproduce` on a GPU, end to end, before anyone spends GPU hours on the whole table.
#
#   bash tools/gpu_reproduce_check.sh OUT_DIR [--cpu] [--row qvhighlights/VideoLights-B] [--epochs 3]
#
# On the stand-in archives (`reproduce --smoke`: QVHighlights' real annotations, 2000 records per split, features
# with a planted query-clip link) it
#   1. times a few training steps of the paper's model for every shape of the row on this device
#      (`reproduce --plan --measure`; OUT_DIR/run/step_times.json) and prints the plan with those step times;
#   2. trains the row with the paper's model for a few epochs on the GPU (its pretraining first for a -pt row),
#      reloads the best checkpoint, predicts val and test, writes submission.zip and reproduction.md;
#   3. checks the outputs: result.json, the reloaded checkpoint scoring what training recorded, the CodaLab zip,
#      the row in reproduction.md, and prints the measured seconds per step beside the plan's H200 figure.
# --cpu runs the same logic on the CPU with the small smoke model, 200 records and 1 epoch (a dry run of this script).
# Writes OUT_DIR/summary.txt (one line per step with its exit status and seconds) and OUT_DIR/*.log.
set -u
OUT=${1:?usage: bash tools/gpu_reproduce_check.sh OUT_DIR [--cpu] [--row DATASET/MODEL] [--epochs N]}
shift
DEVICE=cuda; ROW=qvhighlights/VideoLights-B; EPOCHS=3; RECORDS=2000; MODEL=--paper-model
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) DEVICE=cpu; EPOCHS=1; RECORDS=200; MODEL= ;;
    --row) ROW=$2; shift ;;
    --epochs) EPOCHS=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."   # the repository root
[ -x .venv/bin/python ] && V=.venv/bin/ || V=
PY=${PY:-${V}python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
: >"$OUT/summary.txt"
FAIL=0
step() {  # step NAME LOG cmd...: run, note exit status and seconds
  local name=$1 log=$2; shift 2
  local t=$(date +%s)
  "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && FAIL=1
  echo "$name: rc=$rc $(( $(date +%s) - t ))s" | tee -a "$OUT/summary.txt"
}
{ date -u; command -v nvidia-smi >/dev/null && nvidia-smi; $PY -c "import torch; print('torch', torch.__version__,
  'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"; } >"$OUT/env.txt" 2>&1

RUN="$OUT/run"
COMMON=(--smoke --smoke-records "$RECORDS" $MODEL --device "$DEVICE" --only "$ROW" --out "$RUN" --no-progress)
step plan_measure plan.log $PY -m videolights reproduce "${COMMON[@]}" --plan --measure
step reproduce reproduce.log $PY -m videolights reproduce "${COMMON[@]}" --epochs "$EPOCHS"
step check check.log $PY - "$RUN" "$ROW" <<'EOF'
import json, sys, zipfile
from pathlib import Path
run, row = Path(sys.argv[1]), sys.argv[2]
res = sorted((run/'runs'/row).glob('**/result.json'))
assert res, f'no result.json under {run/"runs"/row}'
r = json.loads(res[0].read_text())
print('result:', {k: r[k] for k in ('job', 'epochs', 'best_epoch', 'steps', 'train_seconds', 'reload_max_diff')})
assert r['reload_max_diff'] <= 1e-6, f"the reloaded best checkpoint scores differently: {r['reload_max_diff']}"
if row.startswith('qvhighlights/'):
    names = sorted(zipfile.ZipFile(r['submission']).namelist())
    assert names == ['hl_test_submission.jsonl', 'hl_val_submission.jsonl'], names
md = (run/'reproduction.md').read_text()
model = row.split('/')[1]
assert f'| {model} |' in md, f'{model} missing from reproduction.md'
times = json.loads((run/'step_times.json').read_text())
step = r['train_seconds'] / max(r['steps'], 1)
print(f"seconds per step in this run (data loading included): {step:.3f}")
for k, v in times.items(): print(f"measured by --plan --measure: {k}: {v['step_s']:.3f} s ({v['device']})")
print("the plan's H200 figure for the paper's batch-32 step: 0.104 s (eager float32)")
EOF
tail -n 30 "$OUT/plan.log" > "$OUT/plan_tail.log" 2>/dev/null
echo "done: $( [ $FAIL -eq 0 ] && echo all passed || echo FAILED ) ($OUT/summary.txt)" | tee -a "$OUT/summary.txt"
exit $FAIL
