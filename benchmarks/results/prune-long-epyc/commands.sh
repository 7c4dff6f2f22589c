#!/usr/bin/env bash
# The evaluation steps of README.md, as run on 2026-12-02 (16:25-16:34 UTC). O: where eval and bench write.
set -x
cd "$(dirname "$0")/../../.."  # the repository root
BASE=benchmarks/runs/recipe/epyc-30min-seed7/pspnet-scratch/best.pt
PR=benchmarks/runs/prune-long/ratio35/best.pt
E=benchmarks/runs/prune-long/engines
D=../shared/data/kaggle_3m
O=${O:-/tmp/bench/pe}
L=.venv/bin/lggdeploy
$L eval $BASE --data $D --split val -o $O/eval_base_val.json
$L eval $PR --data $D --split val -o $O/eval_pruned_val.json
$L eval $PR --data $D --split test -o $O/eval_pruned_test.json
# optimize's pruning gate: the pruned model's FP32 engine judged against the unpruned model (forced so it is written either way)
.venv/bin/python - <<'PY'
from pathlib import Path
from lggdeploy.engines.build import BuildOptions, build_engines
r = build_engines([Path("benchmarks/runs/prune-long/ratio35/best.pt")], BuildOptions(out_dir=Path("benchmarks/runs/prune-long/gate-vs-unpruned"), data=Path("../shared/data/kaggle_3m"), backend="onnxruntime", precision="fp32", reference=Path("benchmarks/runs/recipe/epyc-30min-seed7/pspnet-scratch/best.pt"), force=True, qat="off"))
print(r)
PY
$L build $BASE --backend onnxruntime --precision fp32 --data $D -o $E
$L build $BASE --backend openvino --precision fp32 --data $D -o $E
$L build $BASE --backend openvino --precision int8 --data $D -o $E
$L build $PR --backend openvino --precision int8 --data $D -o $E
$L bench $E --data $D --batch-sizes 1,8 --iters 20 --format md --out $O/bench
