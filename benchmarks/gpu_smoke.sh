#!/usr/bin/env bash
# One prepared script for a GPU machine (TensorRT not needed): doctor; the TensorRT runner's cuda-python calls with a
# stub engine; PyTorch CUDA FP32/FP16 bench rows on the phantom set; `verify` of an ONNX Runtime bundle.
# usage: bash benchmarks/gpu_smoke.sh [OUT]   (after `make install`; OUT defaults to benchmarks/results/gpu_smoke)
set -uo pipefail
OUT=${1:-benchmarks/results/gpu_smoke}
WORK=$(mktemp -d)
mkdir -p "$OUT"
L=.venv/bin/lggdeploy
{
  echo "# date: $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  echo "\$ lggdeploy doctor"; $L doctor
  echo "\$ pip install cuda-python (for the runner's CUDA calls)"; .venv/bin/pip install -q 'cuda-python>=12,<14' 2>&1 | tail -1
  echo "\$ python benchmarks/gpu_smoke.py"; .venv/bin/python benchmarks/gpu_smoke.py "$OUT/tensorrt_runner_cuda.json"; echo "exit $?"
  echo "\$ phantom set, 3 epochs on the GPU, fp32 engine, bench (torch cuda fp32/fp16 rows appear beside the CPU reference)"
  $L data synth "$WORK/phantom" --patients 6 --min-slices 10 --max-slices 14
  $L train --model pspnet-scratch --data "$WORK/phantom" --out "$WORK/run" --epochs 3 --img-size 128 --device cuda
  $L build "$WORK/run/best.pt" --precision all -o "$WORK/engines"
  $L bench "$WORK/engines" --split val --batch-sizes 1,8 --iters 30 --format md --out "$OUT/bench"
  echo "\$ pack + verify (ONNX Runtime bundle)"
  $L pack "$WORK"/engines/*/onnxruntime-fp32.onnx -o "$WORK/bundle.tar.gz" --samples 8
  $L verify "$WORK/bundle.tar.gz"; echo "exit $?"
} 2>&1 | grep -v "━" | tee "$OUT/gpu_smoke.log"
