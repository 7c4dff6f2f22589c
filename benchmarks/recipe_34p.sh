#!/usr/bin/env bash
# The recipe benchmark on the shared patients (issue 14): every run trains on this CPU, split seed 0 (24/5/5 of 34).
# usage: DATA=../shared/data/kaggle_3m bash benchmarks/recipe_34p.sh   (from the repository root, after `make install`)
# Runs are kept in benchmarks/runs/recipe (ignored by git); records go to benchmarks/results/recipe.
#   A  the previous defaults (Dice + BCE, no oversampling, no EMA, threshold 0.5), 11 epochs: benchmarks/results/34p
#   B  the recipe: per-image Dice + BCE, half of each epoch from tumor slices, 0.5-epoch warm-up, EMA 0.99, tuned threshold
#   C  B without the two training-data changes (pooled Dice, no oversampling): what oversampling + per-image Dice buy
#   T1/T2  the transfer presets from random init (no ImageNet weights here) with B's recipe, 30-minute budget
#          (unet-effb7 at 128 px: at 256 px one epoch alone is longer than the budget on 2 cores)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
RUNS=benchmarks/runs/recipe
RES=benchmarks/results/recipe
RECIPE="--loss image-dice --tumor-fraction 0.5 --warmup-epochs 0.5 --ema 0.99 --tune-threshold"
run() {  # name preset extra-args...
  local name=$1 preset=$2; shift 2
  [ -f "$RUNS/$name/$preset/best.pt" ] && { echo "$name: reusing $RUNS/$name/$preset"; return; }
  OUT=$RES/$name RUNS=$RUNS/$name DATA=$DATA bash benchmarks/train_cpu.sh "$preset" "$@" 2>&1 | tee "$RUNS/$name.log"
}
mkdir -p "$RUNS" "$RES"
[ -f benchmarks/runs/34p/pspnet-scratch/best.pt ] || OUT=benchmarks/results/34p/train_cpu_pspnet-scratch RUNS=benchmarks/runs/34p DATA=$DATA bash benchmarks/train_cpu.sh pspnet-scratch 11
run full pspnet-scratch 11 $RECIPE
run no-data-changes pspnet-scratch 11 --warmup-epochs 0.5 --ema 0.99 --tune-threshold
run transfer-resnext50 pspnet-resnext50 1000 $RECIPE --encoder-weights random --budget-minutes 30
run transfer-effb7 unet-effb7 1000 $RECIPE --encoder-weights random --budget-minutes 30 --img-size 128  # 256 px: one epoch takes longer than the budget
.venv/bin/python benchmarks/report_recipe.py --data "$DATA" --out "$RES" A=benchmarks/runs/34p/pspnet-scratch B=$RUNS/full/pspnet-scratch \
  C=$RUNS/no-data-changes/pspnet-scratch T1=$RUNS/transfer-resnext50/pspnet-resnext50 T2=$RUNS/transfer-effb7/unet-effb7
.venv/bin/python benchmarks/train_speed.py --data "$DATA" --out "$RES"
