#!/usr/bin/env bash
# Accuracy evidence on the 34 shared patients (24 / 5 / 5): engines of a CPU-trained pspnet-scratch built behind the
# per-patient gate (cpu and tensorrt INT8 profiles), the two INT8 sensitivity rankings compared, and bench on the
# 5 test patients with the A/A noise row.
# usage: benchmarks/gate_34p.sh   (from the repository root, after
#        OUT=benchmarks/results/34p/train_cpu_pspnet-scratch RUNS=benchmarks/runs/34p bash benchmarks/train_cpu.sh pspnet-scratch 11)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
RUN=${RUN:-benchmarks/runs/34p/pspnet-scratch}
ENGINES=${ENGINES:-benchmarks/runs/34p/engines}
OUT=${OUT:-benchmarks/results/34p}
mkdir -p "$OUT/bench"
{
  echo "# date: $(date -u +%FT%TZ)"
  echo "\$ lggdeploy build $RUN/best.pt --precision all --data $DATA -o $ENGINES"
  /usr/bin/time -f "wall %e s" .venv/bin/lggdeploy build "$RUN/best.pt" --precision all --data "$DATA" -o "$ENGINES" || echo "exit code $?"
  echo "\$ lggdeploy build $RUN/best.pt --precision int8 --int8-profile tensorrt --data $DATA -o $ENGINES"
  /usr/bin/time -f "wall %e s" .venv/bin/lggdeploy build "$RUN/best.pt" --precision int8 --int8-profile tensorrt --data "$DATA" -o "$ENGINES" || echo "exit code $?"
} 2>&1 | grep -v "━" > "$OUT/build.log"
.venv/bin/lggdeploy bench "$ENGINES" --data "$DATA" --split test --batch-sizes 1,8 --iters 20 --format md --out "$OUT/bench" 2>&1 | grep -v "━" > "$OUT/bench/bench_stdout.md"
.venv/bin/python benchmarks/ranking_compare.py "$RUN/best.pt" --data "$DATA" --out "$OUT" --engines "$ENGINES" 2>&1 | grep -v "━" > "$OUT/ranking_compare.log"
