#!/usr/bin/env bash
# Activation predictors end to end on one ReLUfied model: collect, train (gate start
# and, for comparison, the paper's random start on the same budget), eval, PowerInfer export and
# round trip, then decode dense / exact sparse / predictor-driven with the quality cost.
#
#   bash benchmarks/predictors_pipeline.sh MODEL NAME
#   e.g. COLLECT_ARGS="--act relu" DECODE_ARGS="--threshold 0" \
#          bash benchmarks/predictors_pipeline.sh smollm2-135m smollm2_relu   (the bare swap)
#        RANDOM_INIT=0 bash benchmarks/predictors_pipeline.sh runs/frontier/prosparse-1.5/final \
#          smollm2_prosparse1.5                                          (a ProSparse model)
#
# Writes runs/predictors/NAME/ (pairs, predictors) and benchmarks/results/predictors_NAME_*.json;
# results in docs/results/predictors.md.
# Budget knobs (environment): TOKENS (61440), TRAIN_TOKENS (30000), EPOCHS (3), RANDOM_INIT (1:
# also train from random weights, the paper's start, on the same budget).
set -euo pipefail
model=$1 name=$2
read -r -a collect_args <<< "${COLLECT_ARGS:-}"
read -r -a decode_args <<< "${DECODE_ARGS:-}"
P=${PROSPARSE:-.venv/bin/prosparse}
run=runs/predictors/$name
res=benchmarks/results/predictors_${name}
TOKENS=${TOKENS:-61440} TRAIN_TOKENS=${TRAIN_TOKENS:-30000} EPOCHS=${EPOCHS:-3}
mkdir -p "$run"
[ -f "$run/pairs/meta.json" ] || "$P" predictors collect "$model" "${collect_args[@]}" --tokens "$TOKENS" \
  --seq-len 512 --out "$run/pairs"
train=(--epochs "$EPOCHS" --patience 1 --max-tokens "$TRAIN_TOKENS" --target-recall 0.95)
"$P" predictors train "$run/pairs" --out "$run/gate" "${train[@]}" --init gate \
  --json "${res}_gate.json" --plot "${res}_gate.png" --overwrite
if [ "${RANDOM_INIT:-1}" = 1 ]; then
  "$P" predictors train "$run/pairs" --out "$run/random" "${train[@]}" --init random \
    --json "${res}_random.json" --overwrite
fi
"$P" predictors export "$run/gate" --powerinfer "$run/powerinfer" --overwrite
"$P" predictors eval "$run/powerinfer" "$run/pairs" --json "${res}_powerinfer_eval.json"
"$P" bench decode "$model" "${decode_args[@]}" --predictors "$run/gate" --new-tokens 48 --json "${res}_decode.json"
