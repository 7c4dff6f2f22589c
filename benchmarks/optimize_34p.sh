#!/usr/bin/env bash
# `lggdeploy optimize` on the 34 shared patients (24 / 5 / 5) for the CPU-trained pspnet-scratch, and the pruning
# fine-tune with and without distillation on the same budget (0.3 of the channels, 2 epochs), scored on val and test.
# usage: benchmarks/optimize_34p.sh   (from the repository root, after benchmarks/qat_34p.sh, whose distilled
#        pruned30 checkpoint — `lggdeploy prune --ratio 0.3 --finetune-epochs 2`, optimize's own settings — is reused)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
CKPT=${CKPT:-benchmarks/runs/34p/pspnet-scratch/best.pt}
RUNS=${RUNS:-benchmarks/runs/optimize}
OUT=${OUT:-benchmarks/results/optimize}
PRUNED=${PRUNED:-benchmarks/runs/qat/pruned30}
L=.venv/bin/lggdeploy
mkdir -p "$RUNS" "$OUT"
if [ -f "$PRUNED/best.pt" ] && [ ! -f "$RUNS/optimize/pruned/ratio30/done.json" ]; then
  mkdir -p "$RUNS/optimize/pruned"
  cp -r "$PRUNED" "$RUNS/optimize/pruned/ratio30"
  .venv/bin/python -c "import json,sys; from lggdeploy.common.files import sha256_file; p='$RUNS/optimize/pruned/ratio30/best.pt'; json.dump({'ratio': 0.3, 'sha256': sha256_file(p), 'copied_from': '$PRUNED'}, open('$RUNS/optimize/pruned/ratio30/done.json', 'w'))"
fi
{
  echo "# date: $(date -u +%FT%TZ)"
  if [ ! -f "$RUNS/pruned30-plain/best.pt" ]; then
    echo "\$ lggdeploy prune $CKPT --ratio 0.3 --finetune-epochs 2 --no-distill --data $DATA -o $RUNS/pruned30-plain"
    /usr/bin/time -f "wall %e s" $L prune "$CKPT" --ratio 0.3 --finetune-epochs 2 --no-distill --data "$DATA" -o "$RUNS/pruned30-plain"
  fi
  for run in "$RUNS/optimize/pruned/ratio30" "$RUNS/pruned30-plain"; do
    for split in val test; do
      echo "\$ lggdeploy eval $run/best.pt --data $DATA --split $split"
      $L eval "$run/best.pt" --data "$DATA" --split "$split" -o "$run/eval_$split.json" | tail -4
    done
  done
  echo "\$ lggdeploy optimize $CKPT --data $DATA -o $RUNS/optimize --prune-ratios 0.3 --prune-epochs 2 --iters 20"
  /usr/bin/time -f "wall %e s" $L optimize "$CKPT" --data "$DATA" -o "$RUNS/optimize" --prune-ratios 0.3 --prune-epochs 2 --iters 20
} 2>&1 | grep --line-buffered -v "━" > "$OUT/optimize.log"
cp "$RUNS/optimize/optimize.md" "$RUNS/optimize/optimize.json" "$RUNS/optimize/front.png" "$OUT/"
