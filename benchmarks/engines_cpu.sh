#!/usr/bin/env bash
# Build every CPU engine for the checkpoints trained by train_cpu.sh, then bench them on the test split.
# usage: benchmarks/engines_cpu.sh   (from the repository root, after the train_cpu.sh runs)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
RUNS=${RUNS:-benchmarks/runs}
OUT=benchmarks/results/engines_cpu
ENGINES=${ENGINES:-benchmarks/runs/engines}
mkdir -p "$OUT"
CKPTS="$RUNS/pspnet-scratch/best.pt $RUNS/pspnet-resnext50/best.pt $RUNS/unet-effb7/best.pt"
{
  echo "# date: $(date -u +%FT%TZ)"
  echo "\$ lggdeploy build $CKPTS --precision all --data $DATA -o $ENGINES"
  /usr/bin/time -f "wall %e s" .venv/bin/lggdeploy build $CKPTS --precision all --data "$DATA" -o "$ENGINES" || echo "exit code $?"
  echo "\$ lggdeploy build $RUNS/pspnet-scratch/best.pt --precision int8 --int8-profile tensorrt --calib-method entropy --data $DATA -o $ENGINES"
  /usr/bin/time -f "wall %e s" .venv/bin/lggdeploy build "$RUNS/pspnet-scratch/best.pt" --precision int8 --int8-profile tensorrt --calib-method entropy --data "$DATA" -o "$ENGINES" || echo "exit code $?"
} 2>&1 | grep -v "━" > "$OUT/build.log"
.venv/bin/lggdeploy bench "$ENGINES" --data "$DATA" --split test --batch-sizes 1,8 --iters 20 --format md --out "$OUT" 2>&1 | grep -v "━" > "$OUT/bench_stdout.md"
