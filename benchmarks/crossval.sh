#!/usr/bin/env bash
# K-fold cross-validation of a training recipe on the shared patients: every patient is a test patient once.
# usage: benchmarks/crossval.sh PRESET FOLDS [extra `lggdeploy train` options...]   (from the repository root)
#   FOLD_LIST="1 2" trains only those folds (a fold whose eval_test.json exists is skipped: rerun to continue)
#   DATA, OUT (default benchmarks/results/crossval_PRESET), RUNS (default benchmarks/runs/crossval_PRESET), SPLIT_SEED (0)
# Each fold is benchmarks/train_cpu.sh with --split-file; benchmarks/report_crossval.py pools the folds' test patients.
set -euo pipefail
PRESET=${1:?preset}
FOLDS=${2:?number of folds}
shift 2
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
OUT=${OUT:-benchmarks/results/crossval_${PRESET}}
RUNS=${RUNS:-benchmarks/runs/crossval_${PRESET}}
.venv/bin/lggdeploy data split "$DATA" --folds "$FOLDS" --seed "${SPLIT_SEED:-0}" -o "$OUT/folds" > /dev/null
for k in ${FOLD_LIST:-$(seq 1 "$FOLDS")}; do
  if [ -f "$OUT/fold-$k/eval_test.json" ]; then echo "fold $k: done before, kept"; continue; fi
  OUT="$OUT/fold-$k" RUNS="$RUNS/fold-$k" DATA="$DATA" bash benchmarks/train_cpu.sh "$PRESET" 1000 --split-file "$OUT/folds/fold-$k-of-$FOLDS.json" "$@"
done
.venv/bin/python benchmarks/report_crossval.py "$OUT" --folds "$FOLDS" --command "benchmarks/crossval.sh $PRESET $FOLDS $*"
