#!/usr/bin/env bash
# PTQ vs QAT on the 34 shared patients (24 / 5 / 5), both INT8 profiles, for pspnet-scratch and its pruned twin
# (0.3 of the channels, 2 epochs distilled from the unpruned model). Each INT8 engine is gated against its own
# checkpoint's FP32 model on the 5 val patients (--force: a failing engine is still written and marked), then one
# bench run on the 5 test patients times every engine side by side with the PyTorch references and the A/A row.
# usage: benchmarks/qat_34p.sh   (from the repository root; CKPT defaults to the 34-patient run of train_cpu.sh)
#   WITH_PRUNED=0 leaves the pruned twin out (the unpruned model only)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
CKPT=${CKPT:-benchmarks/runs/34p/pspnet-scratch/best.pt}
RUNS=${RUNS:-benchmarks/runs/qat}
OUT=${OUT:-benchmarks/results/qat}
L=.venv/bin/lggdeploy
mkdir -p "$RUNS" "$OUT/bench"
{
  echo "# date: $(date -u +%FT%TZ)"
  MODELS="$CKPT"
  [ "${WITH_PRUNED:-1}" = 0 ] || MODELS="$CKPT $RUNS/pruned30/best.pt"
  if [ "${WITH_PRUNED:-1}" != 0 ] && [ ! -f "$RUNS/pruned30/best.pt" ]; then
    echo "\$ lggdeploy prune $CKPT --ratio 0.3 --finetune-epochs 2 --data $DATA -o $RUNS/pruned30"
    /usr/bin/time -f "wall %e s" $L prune "$CKPT" --ratio 0.3 --finetune-epochs 2 --data "$DATA" -o "$RUNS/pruned30"
  fi
  for model in $MODELS; do
    echo "\$ lggdeploy build $model --precision fp32 --data $DATA -o $RUNS/engines-ptq"
    $L build "$model" --precision fp32 --data "$DATA" -o "$RUNS/engines-ptq" || echo "exit code $?"
    for profile in tensorrt cpu; do
      for mode in off always; do
        dir=$RUNS/engines-$([ $mode = off ] && echo ptq || echo qat)
        echo "\$ lggdeploy build $model --precision int8 --int8-profile $profile --qat $mode --data $DATA -o $dir --force"
        /usr/bin/time -f "wall %e s" $L build "$model" --precision int8 --int8-profile "$profile" --qat "$mode" --data "$DATA" -o "$dir" --force || echo "exit code $?"
      done
    done
  done
} 2>&1 | grep -v "━" > "$OUT/build.log"
$L bench "$RUNS" --data "$DATA" --split test --batch-sizes 1,8 --iters 20 --format md --out "$OUT/bench" 2>&1 | grep -v "━" > "$OUT/bench/bench_stdout.md"
.venv/bin/python benchmarks/report_qat.py "$RUNS" "$OUT/bench/bench.json" > "$OUT/table.md"
