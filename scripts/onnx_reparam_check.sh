#!/bin/bash
# A user's export of the trained RepVGG-A0, built as given (--no-fuse) and re-parameterized (the default),
# on MNN INT8 (the collapse) and ORT/OpenVINO FP32 (latency, one interleaved bench run); ~2 min.
# Usage: bash scripts/onnx_reparam_check.sh   (WORK=dir to keep the builds elsewhere; needs data/cifar10: make data)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-/tmp/onnx-reparam}; rm -rf "$W"; mkdir -p "$W"
DK=".venv/bin/deploykit"
.venv/bin/python -c "
import sys; sys.path.insert(0, 'scripts')
from pathlib import Path
from onnx_vs_checkpoint import export_as_a_user_would
export_as_a_user_would('checkpoints/repvgg_a0-cifar10-w0.5.safetensors', Path('$W/user-export.onnx'))"
C=(--calib data/cifar10 --calib-samples 300)
for mode in fused given; do
  flag=(); [[ $mode == given ]] && flag=(--no-fuse)
  $DK build $W/user-export.onnx -t mnn -p int8 "${C[@]}" "${flag[@]}" --out $W/mnn-int8-$mode 2>&1 | tail -2
  for t in onnxruntime openvino; do $DK build $W/user-export.onnx -t $t -p fp32 "${C[@]}" "${flag[@]}" --out $W/$t-fp32-$mode 2>&1 | tail -1; done
done
for t in onnxruntime openvino; do $DK build checkpoints/repvgg_a0-cifar10-w0.5.safetensors -t $t -p fp32 "${C[@]}" --out $W/$t-fp32-ckpt 2>&1 | tail -1; done
for a in mnn-int8-given mnn-int8-fused; do $DK eval $W/$a --data data/cifar10 --limit 2000 2>&1 | tail -1; done
$DK eval $W/user-export.onnx --data data/cifar10 --limit 2000 2>&1 | tail -1
$DK bench --threads 2 --rounds 7 --results $W/latency.json $(for t in onnxruntime openvino; do for m in given fused ckpt; do echo --artifact $W/$t-fp32-$m; done; done) 2>&1 | tail -12
