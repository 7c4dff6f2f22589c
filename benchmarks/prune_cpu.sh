#!/usr/bin/env bash
# Prune the CPU-trained checkpoints at 0.3, fine-tune, build their engines and bench them beside the originals.
# usage: benchmarks/prune_cpu.sh   (from the repository root, after train_cpu.sh and engines_cpu.sh)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
RUNS=${RUNS:-benchmarks/runs}
OUT=benchmarks/results/prune_cpu
ENGINES=$RUNS/engines-prune
mkdir -p "$OUT"
rm -rf "$RUNS/pspnet-scratch-pruned30" "$RUNS/unet-effb7-pruned30" "$ENGINES"
{
  echo "# date: $(date -u +%FT%TZ)"
  echo "\$ lggdeploy prune $RUNS/pspnet-scratch/best.pt --ratio 0.3 --finetune-epochs 2 --data $DATA"
  /usr/bin/time -f "wall %e s" .venv/bin/lggdeploy prune "$RUNS/pspnet-scratch/best.pt" --ratio 0.3 --finetune-epochs 2 --data "$DATA"
  echo "\$ lggdeploy prune $RUNS/unet-effb7/best.pt --ratio 0.3 --finetune-epochs 1 --data $DATA"
  /usr/bin/time -f "wall %e s" .venv/bin/lggdeploy prune "$RUNS/unet-effb7/best.pt" --ratio 0.3 --finetune-epochs 1 --data "$DATA"
  echo "\$ lggdeploy build (original and pruned pspnet-scratch, pruned unet-effb7) --precision all --data $DATA -o $ENGINES"
  .venv/bin/lggdeploy build "$RUNS/pspnet-scratch/best.pt" "$RUNS/pspnet-scratch-pruned30/best.pt" "$RUNS/unet-effb7/best.pt" "$RUNS/unet-effb7-pruned30/best.pt" --precision all --data "$DATA" -o "$ENGINES" || echo "exit code $?"
} 2>&1 | grep -v "━" > "$OUT/prune.log"
.venv/bin/lggdeploy bench "$ENGINES" --data "$DATA" --split test --batch-sizes 1,8 --iters 20 --format md --out "$OUT" 2>&1 | grep -v "━" > "$OUT/bench_stdout.md"
