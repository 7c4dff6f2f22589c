#!/usr/bin/env bash
# Train a preset on the real patients on this machine's CPU, score it on the test split, record everything.
# usage: benchmarks/train_cpu.sh PRESET EPOCHS [extra `lggdeploy train` options...]   (from the repository root)
#   DATA=/path/to/kaggle_3m overrides the data folder (default: $LGG_DATA_DIR or ../shared/data/kaggle_3m)
#   RUNS=folder keeps the run (default: benchmarks/runs, ignored by git; checkpoints are not committed)
set -euo pipefail
PRESET=${1:-pspnet-scratch}
EPOCHS=${2:-8}
shift 2 || true
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
OUT=${OUT:-benchmarks/results/train_cpu_${PRESET}}
RUN=${RUNS:-benchmarks/runs}/${PRESET}
mkdir -p "$OUT"
start=$(date +%s)
.venv/bin/lggdeploy train --model "$PRESET" --data "$DATA" --epochs "$EPOCHS" --out "$RUN" "$@"
seconds=$(( $(date +%s) - start ))
.venv/bin/lggdeploy eval "$RUN/best.pt" --data "$DATA" --split test -o "$OUT/eval_test.json"
.venv/bin/python benchmarks/report_train.py "$RUN" "$OUT" --seconds "$seconds" \
  --command "lggdeploy train --model $PRESET --data $DATA --epochs $EPOCHS $* --out RUN && lggdeploy eval RUN/best.pt --data $DATA --split test"
