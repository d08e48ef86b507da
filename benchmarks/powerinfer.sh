#!/usr/bin/env bash
# PowerInfer beside prosparse on one model and its predictors:
#   prosparse export powerinfer CKPT --predictors PRED, then PowerInfer's own convert.py (sparse)
#   and convert-dense.py (dense); decode tokens/s of both modes (2 threads, median of 3 runs of
#   64 tokens); PowerInfer's sparse-path perplexity on the export's heldout.txt (1 thread: its
#   multi-threaded down projection adds partial sums without a lock), with its predictors and
#   with every neuron kept, against prosparse's for the same function (must agree within 2%);
#   prosparse's own dense / exact / predicted decode of CKPT with PRED (2 threads).
#
# Usage: benchmarks/powerinfer.sh POWERINFER_DIR CKPT PRED [NAME]
#        benchmarks/powerinfer.sh POWERINFER_DIR 7b-shaped [NAME]   # random LLaMA2-7B-shaped ReLU
#          model (LAYERS of 32 layers, default 4) with random predictors calibrated to skip 89%
#
#   POWERINFER_DIR  a PowerInfer checkout you built (build/bin/main and build/bin/perplexity;
#                   CPU: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release &&
#                   cmake --build build --target main perplexity). This script neither downloads
#                   nor builds it.
#   PI_PYTHON       python with the converter's needs: numpy<2, sentencepiece, transformers
#                   (default python3)
#   WORK            scratch folder for the export and the GGUFs (default /tmp/prosparse-powerinfer/NAME)
#   TOKENS, SEQ_LEN held-out tokens and chunk length measured (default 8192, 256)
#   DTYPE           dtype prosparse measures perplexity in (default float32; PowerInfer runs f16)
#
# Writes benchmarks/results/powerinfer_NAME.json and rewrites powerinfer_README_section.md
# there from every powerinfer_*.json (the tables of docs/results/powerinfer.md).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
PI_DIR=$1
CKPT=$2
if [ "$CKPT" = "7b-shaped" ]; then
    PRED=""
    NAME=${3:-llama2-7b-shaped}
else
    PRED=${3:?give PRED, predictors trained on CKPT}
    NAME=${4:-$(basename "$CKPT")}
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:-/tmp/prosparse-powerinfer/$NAME}

cd "$ROOT"
exec "$PY" -c 'import sys; from benchmarks.powerinfer_bench import cli; sys.exit(cli(sys.argv[1:]))' \
    "$PI_DIR" "$CKPT" ${PRED:+"$PRED"} --name "$NAME" --work "$WORK" \
    --python "${PI_PYTHON:-python3}" --tokens "${TOKENS:-8192}" --seq-len "${SEQ_LEN:-256}" \
    --dtype "${DTYPE:-float32}" ${DECODE_DTYPE:+--decode-dtype "$DECODE_DTYPE"} \
    --layers "${LAYERS:-4}"
