#!/usr/bin/env bash
# Regenerates reports/quantization-repvgg-vs-repopt.md (issue #6) from scratch, on this machine:
#   1. train RepVGG-A0, RepOpt-VGG-A0 (hyper-search, scales, RepOptimizer) and QARepVGG-A0 on
#      CIFAR-10 with the same recipe and epochs, at a reduced width (FAST_ARGS: the fast path;
#      KEEP_EVERY: kept checkpoints, each evaluated FP32 / ORT INT8 per tensor and per channel);
#   2. fuse; build FP32 and INT8 artifacts on every CPU backend from ONE calibration set (and
#      TensorRT's Q/DQ ONNX, evaluated on ONNX Runtime: no TensorRT here);
#   3. top-1 of each on the CIFAR-10 test split; per-layer diagnosis (deploykit analyze);
#   4. the accuracy-budgeted fix (deploykit build --max-drop) and its latency cost;
#   5. render the Markdown from the JSON written above (deploykit/report/quant_study.py): no number
#      in the report is typed by hand.
# Every step writes into $WORK and is skipped when its output exists, so an interrupted run
# resumes (trainings continue from their last epoch). Checkpoints are not shipped: this script
# is the one command that regenerates them (runs/quant-report/train/*/model.safetensors).
#
#   bash scripts/quant_report.sh                              the report's budget (see below)
#   WORK=/tmp/qr EPOCHS=1 HS_EPOCHS=1 LIMIT=512 VAL_LIMIT=200 EVAL_LIMIT=500 CALIB_SAMPLES=128 VERIFY_SAMPLES=200 \
#     ANALYZE_SAMPLES=200 REPORT=/tmp/qr/report.md bash scripts/quant_report.sh
#                                                             a smoke run of every command (minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}   # CIFAR-10 tree (train/, test/) or its .tar.gz
WORK=${WORK:-runs/quant-report}
REPORT=${REPORT:-reports/quantization-repvgg-vs-repopt.md}
PY=${PYTHON:-.venv/bin/python}
DK="$PY -m deploykit"
THREADS=${THREADS:-2}
SEED=${SEED:-0}

# Budget (both models identical): RepVGG-A0 layout (2-4-14-1 blocks), width multiplier
# WIDTH on (a, b) = (0.75, 2.5): 12-12-24-48-320 channels per stage at WIDTH 0.25; SGD + Nesterov
# momentum 0.9, lr 0.1 cosine to 0 with one warmup epoch, batch 128, weight decay 5e-4 on
# conv/linear weights, label smoothing 0.1, random crop (pad 4) + flip, seed 0, 2 threads.
# The RepOpt-VGG hyper-search runs HS_EPOCHS on the same data (the paper used CIFAR-100).
WIDTH=${WIDTH-0.25}      # empty: the zoo's full width
EPOCHS=${EPOCHS:-15}
HS_EPOCHS=${HS_EPOCHS:-3}
BATCH=${BATCH:-128}
LR=${LR:-0.1}
WARMUP=${WARMUP:-1}
LIMIT=${LIMIT:-}          # train on a seeded subset of N images (empty: all 50,000)
VAL_LIMIT=${VAL_LIMIT:-}  # validate each epoch on a seeded subset of the test split (empty: all 10,000)
CALIB_SAMPLES=${CALIB_SAMPLES:-512}   # one calibration set for every backend: train split, seed $SEED
MAX_DROP=${MAX_DROP:-1.0}             # top-1 points
VERIFY_SAMPLES=${VERIFY_SAMPLES:-1000}  # held-out train images the max-drop loop scores recipes on
EVAL_LIMIT=${EVAL_LIMIT:-}              # empty: the whole test split (10,000 images)
ANALYZE_SAMPLES=${ANALYZE_SAMPLES:-1000}  # held-out train images the per-layer diagnosis is measured on

# Seconds per epoch (50,000 images, validation every 8th epoch, torch.compile once) with the recipe
# of scripts/train_three.sh (WIDTH 0.5, bf16), 2 threads, as measured by the run behind
# reports/quantization-repvgg-vs-repopt.md on a 2-core Intel Xeon with AMX-BF16 (its training
# table); only for the estimate printed below. Without bf16 units or torch.compile expect ~2x.
SEC_PER_EPOCH_REPVGG=${SEC_PER_EPOCH_REPVGG:-102}
SEC_PER_EPOCH_REPOPT_HS=${SEC_PER_EPOCH_REPOPT_HS:-104}
SEC_PER_EPOCH_REPOPT=${SEC_PER_EPOCH_REPOPT:-54}
SEC_PER_EPOCH_QAREPVGG=${SEC_PER_EPOCH_QAREPVGG:-103}
FAST_ARGS=${FAST_ARGS:-}        # e.g. "--schedule onecycle --precision auto --ema 0.999 --tta-flip" (scripts/train_three.sh)
REPVGG_ARGS=${REPVGG_ARGS:-}    # e.g. "--custom-l2" (the official RepVGG recipe)
KEEP_EVERY=${KEEP_EVERY:-}      # keep every N-th epoch's weights; each is evaluated in section 2b
IMAGES=${LIMIT:-50000}
TRAIN_S=$(( (EPOCHS * SEC_PER_EPOCH_REPVGG + HS_EPOCHS * SEC_PER_EPOCH_REPOPT_HS + EPOCHS * SEC_PER_EPOCH_REPOPT
             + EPOCHS * SEC_PER_EPOCH_QAREPVGG) * IMAGES / 50000 ))
REST_S=4050  # 3 models: 24 builds, 36 test-split evals, 3 analyses, 9 max-drop searches, latency (+ kept checkpoints)
echo "estimated duration: $(( (TRAIN_S + REST_S) / 60 )) min (training $(( TRAIN_S / 60 )) min) on 2 CPU cores" >&2

MODELS=(${MODELS_TO_RUN:-repvgg repopt qarepvgg})
read -r -a FAST <<< "$FAST_ARGS"
read -r -a REPVGG_EXTRA <<< "$REPVGG_ARGS"
KEEP_ARGS=()
[[ -n "$KEEP_EVERY" ]] && KEEP_ARGS=(--keep-every "$KEEP_EVERY")
LIMIT_ARGS=()
[[ -n "$LIMIT" ]] && LIMIT_ARGS=(--limit "$LIMIT")
[[ -n "$VAL_LIMIT" ]] && LIMIT_ARGS+=(--val-limit "$VAL_LIMIT")
WIDTH_ARGS=()
[[ -n "$WIDTH" ]] && WIDTH_ARGS=(--width "$WIDTH")
EVAL_ARGS=()
[[ -n "$EVAL_LIMIT" ]] && EVAL_ARGS=(--limit "$EVAL_LIMIT")
CALIB=(--calib "$DATA" --calib-samples "$CALIB_SAMPLES" --seed "$SEED")
mkdir -p "$WORK"/{eval,latency,maxdrop}

# --- 1. training ------------------------------------------------------------------------
train() {  # NAME ARGS...: start, resume, or skip a finished run (only the models in MODELS_TO_RUN)
  [[ " ${MODELS[*]} " == *" $1 "* ]] || return 0
  local out=$WORK/train/$1; shift
  [[ -f $out/train.json || -f $out/pipeline.json ]] && return 0
  local resume=()
  [[ -d $out/checkpoint || -d $out/hs/checkpoint || -d $out/target ]] && resume=(--resume)
  $DK -v train "$@" --cifar "${WIDTH_ARGS[@]}" --data "$DATA" --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" \
    --warmup-epochs "$WARMUP" --seed "$SEED" --threads "$THREADS" "${LIMIT_ARGS[@]}" ${FAST[@]+"${FAST[@]}"} \
    ${KEEP_ARGS[@]+"${KEEP_ARGS[@]}"} --out "$out" ${resume[@]+"${resume[@]}"}
}
train repvgg repvgg_a0 ${REPVGG_EXTRA[@]+"${REPVGG_EXTRA[@]}"}
train repopt repopt_vgg_a0 --repopt --hs-epochs "$HS_EPOCHS"
train qarepvgg qarepvgg_a0
declare -A CKPT=([repvgg]=$WORK/train/repvgg/model.safetensors [repopt]=$WORK/train/repopt/target/model.safetensors
                 [qarepvgg]=$WORK/train/qarepvgg/model.safetensors)
declare -A KEPT=([repvgg]=$WORK/train/repvgg/checkpoints [repopt]=$WORK/train/repopt/target/checkpoints
                 [qarepvgg]=$WORK/train/qarepvgg/checkpoints)

# --- 2. fuse, build, evaluate -------------------------------------------------------------
# name | target | precision | options
BUILDS=(
  "onnxruntime-fp32|onnxruntime|fp32|"
  "onnxruntime-int8-tensor|onnxruntime|int8|per_channel=false"
  "onnxruntime-int8-channel|onnxruntime|int8|per_channel=true"
  "openvino-fp32|openvino|fp32|"
  "openvino-int8|openvino|int8|"
  "mnn-fp32|mnn|fp32|"
  "mnn-int8|mnn|int8|"
)
evaluate() {  # SUBJECT NAME: top-1 on the whole test split
  if [[ ! -f $WORK/eval/$2.json ]]; then
    $DK eval "$1" --data "$DATA" --threads "$THREADS" "${EVAL_ARGS[@]}" --json > "$WORK/eval/$2.json.tmp"
    mv "$WORK/eval/$2.json.tmp" "$WORK/eval/$2.json"
  fi
}
for m in "${MODELS[@]}"; do
  [[ -f $WORK/fused/$m.safetensors ]] || $DK fuse "${CKPT[$m]}" --out "$WORK/fused/$m.safetensors" \
    --report "$WORK/fused/$m-certificate.json"
  evaluate "${CKPT[$m]}" "$m-torch-fp32"
  for spec in "${BUILDS[@]}"; do
    IFS='|' read -r name target precision option <<< "$spec"
    out=$WORK/build/$m-$name
    opts=()
    [[ -n "$option" ]] && opts=(--option "$option")
    [[ -f $out/build.json ]] || $DK build "${CKPT[$m]}" --target "$target" --precision "$precision" "${CALIB[@]}" \
      --threads "$THREADS" "${opts[@]}" --out "$out"
    evaluate "$out" "$m-$name"
  done
  # TensorRT cannot be installed here: its explicit Q/DQ ONNX (what an engine is built from, same
  # calibration) is evaluated on ONNX Runtime; no engine is built or timed.
  out=$WORK/build/$m-tensorrt-int8-qdq
  [[ -f $out/build.json ]] || $DK build "${CKPT[$m]}" --target tensorrt --precision int8 --emit-only "${CALIB[@]}" \
    --threads "$THREADS" --out "$out"
  evaluate "$out/model.int8.onnx" "$m-tensorrt-int8-qdq"
done

# --- 2b. the INT8 drop over training: every kept checkpoint, FP32 and ORT INT8 (same calibration) -----
for m in "${MODELS[@]}"; do
  for ckpt in "${KEPT[$m]}"/epoch-*.safetensors; do
    [[ -f $ckpt ]] || continue
    epoch=$(basename "$ckpt" .safetensors)
    evaluate "$ckpt" "$m-$epoch-torch-fp32"
    for spec in "onnxruntime-int8-tensor|per_channel=false" "onnxruntime-int8-channel|per_channel=true"; do
      IFS='|' read -r name option <<< "$spec"
      out=$WORK/build/$m-$epoch-$name
      [[ -f $out/build.json ]] || $DK build "$ckpt" --target onnxruntime --precision int8 "${CALIB[@]}" \
        --threads "$THREADS" --option "$option" --out "$out"
      evaluate "$out" "$m-$epoch-$name"
    done
  done
done

# --- 3. diagnosis -----------------------------------------------------------------------------
for m in "${MODELS[@]}"; do
  [[ -f $WORK/analysis/$m/analysis.json ]] || $DK analyze "${CKPT[$m]}" "${CALIB[@]}" \
    --verify-samples "$ANALYZE_SAMPLES" --test-data "$DATA" ${EVAL_LIMIT:+--test-limit "$EVAL_LIMIT"} --out "$WORK/analysis/$m"
done

# --- 4. the max-drop fix and its latency cost ------------------------------------------------
# ONNX Runtime starts from per-tensor weights (its plain int8 build above), the others from
# their defaults; recipes are scored on held-out *train* images, the test split stays unseen.
# The named fix (--int8-fix repvgg: zero dead-channel weights, per-channel, CLE, bias correction)
# needs no budget; it is built and evaluated on every backend too.
for m in "${MODELS[@]}"; do
  for target in onnxruntime openvino mnn; do
    out=$WORK/maxdrop/$m-$target-fix
    [[ -f $out/build.json ]] || $DK build "${CKPT[$m]}" --target "$target" --precision int8 "${CALIB[@]}" \
      --int8-fix repvgg --threads "$THREADS" --out "$out"
    evaluate "$out" "$m-fix-$target"
  done
done
MAXDROP=("onnxruntime|per_channel=false" "openvino|" "mnn|")
for m in "${MODELS[@]}"; do
  for spec in "${MAXDROP[@]}"; do
    IFS='|' read -r target option <<< "$spec"
    out=$WORK/maxdrop/$m-$target
    opts=()
    [[ -n "$option" ]] && opts=(--option "$option")
    # No recipe within budget: exit 3 and no artifact; the one-line reason goes into the report.
    if [[ ! -f $out/build.json && ! -f $out.failed ]]; then
      $DK build "${CKPT[$m]}" --target "$target" --precision int8 "${CALIB[@]}" --verify-samples "$VERIFY_SAMPLES" \
        --max-drop "$MAX_DROP" --threads "$THREADS" "${opts[@]}" --out "$out" 2> "$out.log" \
        || { grep '^error' "$out.log" | tail -1 > "$out.failed"; echo "max-drop $m $target: $(cat "$out.failed")" >&2; }
    fi
    [[ -f $out/build.json ]] && evaluate "$out" "$m-maxdrop-$target"
  done
  for target in onnxruntime openvino mnn; do
    group=()
    for dir in "$WORK/build/$m-$target-fp32" "$WORK/build/$m-$target-int8"* "$WORK/maxdrop/$m-$target"; do
      [[ -f $dir/build.json ]] && group+=("$dir")
    done
    artifacts=()
    for dir in "${group[@]}"; do artifacts+=(--artifact "$dir"); done
    [[ -f $WORK/latency/$m-$target.json ]] || $DK bench "${artifacts[@]}" --threads "$THREADS" \
      --results "$WORK/latency/$m-$target.json"
  done
done

# --- 5. the report ------------------------------------------------------------------------------
SHIPPED_ARGS=()
for f in ${SHIPPED:-}; do SHIPPED_ARGS+=(--shipped "$f"); done
$PY -m deploykit.report.quant_study "$WORK" --script scripts/quant_report.sh --out "$REPORT" \
  --command "${COMMAND:-bash scripts/quant_report.sh}" ${SHIPPED_ARGS[@]+"${SHIPPED_ARGS[@]}"}
echo "wrote $REPORT" >&2
