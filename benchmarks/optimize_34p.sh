#!/usr/bin/env bash
# `lggdeploy optimize` on the 34 shared patients (24 / 5 / 5) for a CPU-trained pspnet-scratch, and (COMPARE_PLAIN=1)
# the pruning fine-tune with and without distillation on the same budget, scored on val and test.
# usage: benchmarks/optimize_34p.sh   (from the repository root)
#   CKPT     the model (default: the 34-patient run of train_cpu.sh, old recipe)
#   RATIOS   pruning ratios of the ladder (default 0.3), PRUNE_EPOCHS fine-tuning epochs per ratio (default 2)
#   PRUNED   a pruned checkpoint folder made with optimize's own settings for the first ratio, reused if present
#            (default: benchmarks/runs/qat/pruned30 of qat_34p.sh)
#   COMPARE_PLAIN=1 also fine-tunes the first ratio without distillation and evaluates both on val and test
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
CKPT=${CKPT:-benchmarks/runs/34p/pspnet-scratch/best.pt}
RUNS=${RUNS:-benchmarks/runs/optimize}
OUT=${OUT:-benchmarks/results/optimize}
PRUNED=${PRUNED:-benchmarks/runs/qat/pruned30}
RATIOS=${RATIOS:-0.3}
PRUNE_EPOCHS=${PRUNE_EPOCHS:-2}
COMPARE_PLAIN=${COMPARE_PLAIN:-1}
FIRST=${RATIOS%%,*}
PCT=$(python3 -c "print(int(round($FIRST * 100)))")
L=.venv/bin/lggdeploy
mkdir -p "$RUNS" "$OUT"
if [ -f "$PRUNED/best.pt" ] && [ ! -f "$RUNS/optimize/pruned/ratio$PCT/done.json" ]; then
  mkdir -p "$RUNS/optimize/pruned"
  cp -r "$PRUNED" "$RUNS/optimize/pruned/ratio$PCT"
  .venv/bin/python -c "import json,sys; from lggdeploy.common.files import sha256_file; p='$RUNS/optimize/pruned/ratio$PCT/best.pt'; json.dump({'ratio': $FIRST, 'sha256': sha256_file(p), 'copied_from': '$PRUNED'}, open('$RUNS/optimize/pruned/ratio$PCT/done.json', 'w'))"
fi
{
  echo "# date: $(date -u +%FT%TZ)"
  if [ "$COMPARE_PLAIN" = 1 ]; then
    if [ ! -f "$RUNS/pruned$PCT-plain/best.pt" ]; then
      echo "\$ lggdeploy prune $CKPT --ratio $FIRST --finetune-epochs $PRUNE_EPOCHS --no-distill --data $DATA -o $RUNS/pruned$PCT-plain"
      /usr/bin/time -f "wall %e s" $L prune "$CKPT" --ratio "$FIRST" --finetune-epochs "$PRUNE_EPOCHS" --no-distill --data "$DATA" -o "$RUNS/pruned$PCT-plain"
    fi
    for run in "$RUNS/optimize/pruned/ratio$PCT" "$RUNS/pruned$PCT-plain"; do
      for split in val test; do
        echo "\$ lggdeploy eval $run/best.pt --data $DATA --split $split"
        $L eval "$run/best.pt" --data "$DATA" --split "$split" -o "$run/eval_$split.json" | tail -4
      done
    done
  fi
  echo "\$ lggdeploy optimize $CKPT --data $DATA -o $RUNS/optimize --prune-ratios $RATIOS --prune-epochs $PRUNE_EPOCHS --iters 20"
  /usr/bin/time -f "wall %e s" $L optimize "$CKPT" --data "$DATA" -o "$RUNS/optimize" --prune-ratios "$RATIOS" --prune-epochs "$PRUNE_EPOCHS" --iters 20
} 2>&1 | grep --line-buffered -v "━" > "$OUT/optimize.log"
cp "$RUNS/optimize/optimize.md" "$RUNS/optimize/optimize.json" "$RUNS/optimize/front.png" "$OUT/"
