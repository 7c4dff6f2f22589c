#!/usr/bin/env bash
# The recipe benchmark on the shared patients (issue 14): every run trains on this CPU, split seed 0 (24/5/5 of 34).
# usage: DATA=../shared/data/kaggle_3m bash benchmarks/recipe_34p.sh   (from the repository root, after `make install`)
# Runs are kept in benchmarks/runs/recipe (ignored by git); records go to benchmarks/results/recipe.
#   A  the previous defaults (Dice + BCE, no oversampling, no warm-up, no EMA, threshold 0.5), 11 epochs (results/34p)
#   C  A + 0.5-epoch warm-up + EMA 0.99 + tuned threshold, 11 epochs
#   B  C + per-image Dice + half of each epoch from tumor slices, 11 epochs
#   D  the defaults of 2026-11-27 (B without the EMA; bf16 autocast on this AVX512-BF16 CPU) with a 30-minute budget
#   D2 today's defaults (D in FP32 channels-last): `lggdeploy train --model pspnet-scratch --budget-minutes 30`
#   D2-s1 the same with --seed 1 (another 24 / 5 / 5 split, test patients disjoint from seed 0's)
#   D3-s3 the same with --seed 3 after the stored post-processing existed (test patients disjoint from seeds 0 and 1)
#   T1/T2  the transfer presets from random init (no ImageNet weights here), today's defaults, 30-minute budget each,
#          run side by side with one core each; unet-effb7 at 128 px (at 256 px an epoch takes about a third of the budget)
set -euo pipefail
DATA=${DATA:-${LGG_DATA_DIR:-../shared/data/kaggle_3m}}
RUNS=benchmarks/runs/recipe
RES=benchmarks/results/recipe
OLD="--loss dice --tumor-fraction 0 --warmup-epochs 0 --ema 0 --no-tune-threshold"
run() {  # name preset epochs extra-args...
  local name=$1 preset=$2; shift 2
  [ -f "$RUNS/$name/$preset/best.pt" ] && { echo "$name: reusing $RUNS/$name/$preset"; return; }
  mkdir -p "$RUNS/$name"
  OUT=$RES/$name RUNS=$RUNS/$name DATA=$DATA bash benchmarks/train_cpu.sh "$preset" "$@" > "$RUNS/$name.log" 2>&1
}
mkdir -p "$RUNS" "$RES"
[ -f benchmarks/runs/34p/pspnet-scratch/best.pt ] || OUT=benchmarks/results/34p/train_cpu_pspnet-scratch RUNS=benchmarks/runs/34p DATA=$DATA \
  bash benchmarks/train_cpu.sh pspnet-scratch 11 $OLD
run no-data-changes pspnet-scratch 11 --loss dice --tumor-fraction 0 --warmup-epochs 0.5 --ema 0.99 --tune-threshold
run full pspnet-scratch 11 --loss image-dice --tumor-fraction 0.5 --warmup-epochs 0.5 --ema 0.99 --tune-threshold
run default-30min pspnet-scratch 1000 --budget-minutes 30 --precision bf16
run default-30min-fp32 pspnet-scratch 1000 --budget-minutes 30
run default-30min-fp32-seed1 pspnet-scratch 1000 --budget-minutes 30 --seed 1   # D2-s1: another split
run default-30min-pp-seed3 pspnet-scratch 1000 --budget-minutes 30 --seed 3   # D3-s3: with the stored post-processing, test patients new to both
run default-30min-pp2-seed296 pspnet-scratch 1000 --budget-minutes 30 --seed 296   # D4-s296: with the two-part rule; test patients in no earlier split's val or test
run mm-30min-seed296 pspnet-scratch 1000 --budget-minutes 30 --seed 296 --missing-modality 0.2   # D4-mm: D4 with the data set's missing-sequence fill on 20 % of slices
run default-30min-seed318 pspnet-scratch 1000 --budget-minutes 30 --seed 318   # D5-s318: today's defaults on another split (HT_A616, FLAIR only, in test)
run slice-30min-seed296 pspnet-scratch 1000 --budget-minutes 30 --seed 296 --normalization slice   # D6-slice: D4-mm (= today's defaults) with per-slice normalization
run slice-30min-seed318 pspnet-scratch 16 --seed 318 --normalization slice   # D6-slice-s318: D5-s318 with per-slice normalization, its 16 epochs fixed (a budget run here got 12 after a slow first epoch on the shared host)
OMP_NUM_THREADS=1 run transfer-resnext50 pspnet-resnext50 1000 --encoder-weights random --budget-minutes 30 &
OMP_NUM_THREADS=1 run transfer-effb7 unet-effb7 1000 --encoder-weights random --budget-minutes 30 --img-size 128 &
wait
.venv/bin/python benchmarks/report_recipe.py --data "$DATA" --out "$RES" A=benchmarks/runs/34p/pspnet-scratch \
  C=$RUNS/no-data-changes/pspnet-scratch "C-raw=$RUNS/no-data-changes/pspnet-scratch:last" B=$RUNS/full/pspnet-scratch \
  "B-raw=$RUNS/full/pspnet-scratch:last" D=$RUNS/default-30min/pspnet-scratch D2=$RUNS/default-30min-fp32/pspnet-scratch \
  T1=$RUNS/transfer-resnext50/pspnet-resnext50 T2=$RUNS/transfer-effb7/unet-effb7
# Post-processing (lggdeploy/postprocess.py) on every run: each rule side by side, and the one training stores today, tuned on each run's val patients.
.venv/bin/python benchmarks/report_postprocess.py --data "$DATA" --out benchmarks/results/postprocess A=benchmarks/runs/34p/pspnet-scratch \
  C=$RUNS/no-data-changes/pspnet-scratch B=$RUNS/full/pspnet-scratch D=$RUNS/default-30min/pspnet-scratch D2=$RUNS/default-30min-fp32/pspnet-scratch \
  D2-s1=$RUNS/default-30min-fp32-seed1/pspnet-scratch T1=$RUNS/transfer-resnext50/pspnet-resnext50 T2=$RUNS/transfer-effb7/unet-effb7 \
  D3-s3=$RUNS/default-30min-pp-seed3/pspnet-scratch D4-s296=$RUNS/default-30min-pp2-seed296/pspnet-scratch \
  D4-mm=$RUNS/mm-30min-seed296/pspnet-scratch
# Missing sequences (pre/post-contrast replaced by FLAIR, the data set's fill) and a darker FLAIR (x0.6) on the runs of today's defaults and D4-mm.
.venv/bin/python benchmarks/report_missing_modality.py --data "$DATA" --out benchmarks/results/missing-modality D2=$RUNS/default-30min-fp32/pspnet-scratch \
  D3-s3=$RUNS/default-30min-pp-seed3/pspnet-scratch D4-s296=$RUNS/default-30min-pp2-seed296/pspnet-scratch D4-mm=$RUNS/mm-30min-seed296/pspnet-scratch
# Per-slice normalization (D6) against today's defaults, splits 296 and 318: as acquired, the FLAIR fill, darker FLAIR, darker/brighter scan.
.venv/bin/python benchmarks/report_missing_modality.py --data "$DATA" --out benchmarks/results/normalization D4-mm=$RUNS/mm-30min-seed296/pspnet-scratch \
  D6-slice=$RUNS/slice-30min-seed296/pspnet-scratch D5-s318=$RUNS/default-30min-seed318/pspnet-scratch D6-slice-s318=$RUNS/slice-30min-seed318/pspnet-scratch
# The threshold tuned on val against 0.5 on the test patients, every run trained with tuning on.
.venv/bin/python benchmarks/report_threshold.py --data "$DATA" --out benchmarks/results/threshold C=$RUNS/no-data-changes/pspnet-scratch \
  B=$RUNS/full/pspnet-scratch D=$RUNS/default-30min/pspnet-scratch D2=$RUNS/default-30min-fp32/pspnet-scratch D2-s1=$RUNS/default-30min-fp32-seed1/pspnet-scratch \
  D3-s3=$RUNS/default-30min-pp-seed3/pspnet-scratch T1=$RUNS/transfer-resnext50/pspnet-resnext50 T2=$RUNS/transfer-effb7/unet-effb7 \
  D4-s296=$RUNS/default-30min-pp2-seed296/pspnet-scratch D4-mm=$RUNS/mm-30min-seed296/pspnet-scratch D5-s318=$RUNS/default-30min-seed318/pspnet-scratch \
  D6-slice=$RUNS/slice-30min-seed296/pspnet-scratch D6-slice-s318=$RUNS/slice-30min-seed318/pspnet-scratch
.venv/bin/python benchmarks/train_speed.py --data "$DATA" --out "$RES" --steps 8 --rounds 2  # needs the machine to itself
.venv/bin/python benchmarks/train_speed.py --data "$DATA" --out "$RES/train_speed_confirm" --steps 8 --rounds 5 --no-compile
# 2026-12-01, a CPU with AMX: the training step (bf16 autocast on AMX tiles), then today's defaults on split 7 (D7-s7)
# and unet-effb7 at 256 px from random init in the same 30-minute budget (for optimize; under-trained).
.venv/bin/python benchmarks/train_speed.py --data "$DATA" --out "$RES/train_speed_amx" --steps 8 --rounds 3 --no-compile
OUT=$RES/amx-30min-seed7 RUNS=$RUNS/amx-30min-seed7 DATA=$DATA bash benchmarks/train_cpu.sh pspnet-scratch 1000 --budget-minutes 30 --seed 7
OUT=$RES/effb7-256-amx RUNS=$RUNS/effb7-256-amx DATA=$DATA bash benchmarks/train_cpu.sh unet-effb7 1000 --encoder-weights random --budget-minutes 30 --seed 7
# 2026-12-02: unet-effb7 at 256 px again with --bn-momentum 0.1 (the new default), then its batch-norm statistics
# against recomputed ones for both runs (results/recipe/bn-momentum/).
OUT=$RES/effb7-256-bnm RUNS=$RUNS/effb7-256-bnm DATA=$DATA bash benchmarks/train_cpu.sh unet-effb7 1000 --encoder-weights random --budget-minutes 30 --seed 7
.venv/bin/python benchmarks/recompute_bn.py $RUNS/effb7-256-amx/unet-effb7/best.pt $RUNS/effb7-256-bnm/unet-effb7/best.pt --data "$DATA" --out "$RES/bn-momentum/recompute_bn.json"
# 2026-12-02, an AMD EPYC with AVX2 only (no VNNI, no BF16; issue 12's machine kind): D7-s7's command again, the model of
# results/optimize-epyc/ (nine 186-229 s epochs in the 30 minutes instead of the AMX CPU's eighteen).
OUT=$RES/epyc-30min-seed7 RUNS=$RUNS/epyc-30min-seed7 DATA=$DATA bash benchmarks/train_cpu.sh pspnet-scratch 1000 --budget-minutes 30 --seed 7
