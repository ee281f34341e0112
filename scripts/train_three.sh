#!/usr/bin/env bash
# Trains RepVGG-A0, RepOpt-VGG-A0 and QARepVGG-A0 on CIFAR-10 with ONE recipe and budget (the fast
# path of `deploykit train`), keeps every KEEP_EVERY-th epoch's weights, then regenerates the
# quantization report over the three models and their kept checkpoints (scripts/quant_report.sh,
# same WORK: finished trainings are skipped there, interrupted ones resume).
#
#   bash scripts/train_three.sh                                   the report's budget
#   WORK=/tmp/t3 EPOCHS=2 HS_EPOCHS=1 KEEP_EVERY=1 LIMIT=256 VAL_LIMIT=100 EVAL_LIMIT=100 CALIB_SAMPLES=64 \
#     VERIFY_SAMPLES=100 ANALYZE_SAMPLES=100 REPORT=/tmp/t3/report.md bash scripts/train_three.sh
#                                                                 a smoke run of every command
# Measured with this recipe on a quiet 2-core Intel Xeon (AMX-BF16): RepVGG-A0 98 s/epoch (54 min),
# RepOpt-VGG-A0 3 hyper-search epochs + 32 target epochs at 54 s/epoch (34 min), QARepVGG-A0 89 s/epoch
# (55 min); then ~15-20 min of builds, evaluations, analyses and latency per model
# (reports/quantization-repvgg-vs-repopt.md).
set -euo pipefail
cd "$(dirname "$0")/.."

export WIDTH=${WIDTH-0.5}          # A0 layout at half width: 24-24-48-96-640 channels (state it in the report)
export EPOCHS=${EPOCHS:-32}        # RepVGG-A0 w0.5: 54 min here (98 s/epoch), RepOpt-VGG 34 min
export HS_EPOCHS=${HS_EPOCHS:-3}
export BATCH=${BATCH:-256}
export LR=${LR:-0.2}
export WARMUP=${WARMUP:-0}         # onecycle: 0 = peak at 25% of the steps
export KEEP_EVERY=${KEEP_EVERY:-8}
# The same fast recipe for all three: one-cycle, bf16 autocast where /proc/cpuinfo shows bf16 units,
# EMA of the weights, flip test-time augmentation (label smoothing 0.1 is the default), torch.compile
# of the training step, validation every 8th epoch (and the kept and last ones).
export FAST_ARGS=${FAST_ARGS:---schedule onecycle --precision auto --ema 0.999 --tta-flip --compile --eval-every 8}
# RepVGG with the official recipe's custom L2 (set REPVGG_ARGS= to train it with plain L2).
export REPVGG_ARGS=${REPVGG_ARGS---custom-l2}
export WORK=${WORK:-runs/train-32}
export REPORT=${REPORT:-reports/quantization-repvgg-vs-repopt.md}
export COMMAND=${COMMAND:-bash scripts/train_three.sh}   # what the report says ran it
# The checkpoints kept in the repository (scripts/pack_checkpoint.py of train/repvgg/model.safetensors,
# the one the demo uses, and of train/repopt/target/model.safetensors); QARepVGG's would pass 8 MB.
export SHIPPED=${SHIPPED-checkpoints/repvgg_a0-cifar10-w0.5.safetensors checkpoints/repopt_vgg_a0-cifar10-w0.5.safetensors}
exec bash scripts/quant_report.sh
