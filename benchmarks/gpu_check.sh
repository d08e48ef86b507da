#!/usr/bin/env bash
# Every claim a GPU user relies on, measured in one run on one CUDA GPU (about 9 minutes on an
# H200):
#
#     OUT=benchmarks/results/gpu bash benchmarks/gpu_check.sh
#     bash benchmarks/gpu_check.sh --dry-run     # the same steps on the CPU, tiny sizes
#
#  1. env      device, driver, torch / Triton / transformers versions, copy bandwidth, bf16 rate
#  2. tests    `pytest -m gpu` and the operator and sync-free kernel tests, on the device
#  3. ops      `bench ops --device cuda --predicted`: steps (2), (3) and the predictor-driven FFN
#              against cuBLAS, bf16 and fp16, LLaMA2-7B and 13B shapes, sparsity 0.5-0.95,
#              achieved GB/s and share of the copy bandwidth
#  4. decode   32-layer LLaMA2-7B-shaped bf16 model: dense vs exact sparse vs predicted, static
#              KV cache, each step a CUDA graph replay (benchmarks/gpu_decode.py), byte bounds
#  5. train    the make demo recipe's step, embedded model and a random 1B LLaMA: tokens/s and
#              peak memory, L1 off / on / on + distillation (benchmarks/gpu_train.py)
#  6. demo     `prosparse demo` end to end: wall time and the before/after table
#  7. 2:4      `to_semi_structured_` prefill and decode against dense
#  8. sweep    launch shapes of the sync-free kernels against cuBLAS
#
# A step that fails is reported and the rest still run; a step gets at most its own limit and
# what is left of GPU_CHECK_BUDGET (seconds, default 540); GPU_CHECK_SKIP="2:4 sweep" leaves
# steps out (by their first word). Everything lands in $OUT:
# gpu_check.json (every step's status and results), gpu_check.log, raw.tar.gz (step outputs).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/gpu}
BUDGET=${GPU_CHECK_BUDGET:-540}
mkdir -p "$OUT"
RAW=$(mktemp -d)
LOG="$OUT/gpu_check.log"
: >"$LOG"
T0=$SECONDS
exec > >(tee -a "$LOG") 2>&1

step() {  # step NAME LIMIT CMD...: run under the smaller of LIMIT and the budget left
    local name=$1 limit=$2
    shift 2
    if [[ " ${GPU_CHECK_SKIP:-} " == *" ${name%% *} "* ]]; then
        echo "== $name: skipped (GPU_CHECK_SKIP)"
        printf '{"step":"%s","status":"skipped","seconds":0}\n' "$name" >>"$RAW/steps.jsonl"
        return
    fi
    local left=$((BUDGET - (SECONDS - T0)))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: skipped (budget spent)"
        printf '{"step":"%s","status":"skipped","seconds":0}\n' "$name" >>"$RAW/steps.jsonl"
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    local t=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    echo "== $name: $status (rc $rc, $((SECONDS - t)) s)"
    printf '{"step":"%s","status":"%s","rc":%d,"seconds":%d}\n' "$name" "$status" "$rc" \
        "$((SECONDS - t))" >>"$RAW/steps.jsonl"
}

if ((DRY)); then
    DEV=cpu
    echo "dry run on the CPU: tiny sizes, each step checks its own plumbing"
else
    DEV=cuda
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: error: $PY sees no CUDA device; run this on a GPU machine, or" \
            "bash benchmarks/gpu_check.sh --dry-run to check the steps here"
        exit 2
    fi
    nvidia-smi || echo "nvidia-smi: not available"
fi

step env 60 "$PY" benchmarks/gpu_env.py --json "$RAW/env.json"

if ((DRY)); then
    step tests 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests \
        --junitxml="$RAW/tests.xml"
else
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    step tests 180 "$PY" -m pytest -q -p no:cacheprovider $XDIST -m "gpu or not slow" \
        tests/kernels/test_operators.py tests/kernels/test_triton_syncfree.py \
        tests/pruning/test_semi_structured.py tests/inference/test_sparse_mlp.py \
        tests/predictors/test_train_metrics.py --junitxml="$RAW/tests.xml"
fi

if ((DRY)); then
    step ops 120 "$PY" -m prosparse.cli bench ops --device cpu --dtype bf16 --d-model 512 \
        --d-ff 1376 --sparsity 0.5,0.8932 --reps 3 --warmup 1 --predicted \
        --json "$RAW/ops_7b_bf16.json"
else
    for shape in "7b 4096 11008" "13b 5120 13824"; do
        set -- $shape
        for dtype in bf16 fp16; do
            step "ops $1 $dtype" 60 "$PY" -m prosparse.cli bench ops --device cuda \
                --dtype "$dtype" --d-model "$2" --d-ff "$3" --sparsity 0.5,0.7,0.8932,0.95 \
                --reps 30 --warmup 5 --predicted --json "$RAW/ops_$1_$dtype.json"
        done
    done
fi

if ((DRY)); then
    step decode 300 "$PY" benchmarks/gpu_decode.py --layers 2 --device cpu --no-graph \
        --new-tokens 8 --rounds 2 --json "$RAW/decode.json"
else
    step decode 150 "$PY" benchmarks/gpu_decode.py --layers 32 --new-tokens 128 --rounds 5 \
        --json "$RAW/decode.json"
fi

if ((DRY)); then
    step train 300 "$PY" benchmarks/gpu_train.py --models smollm2 --steps 3 \
        --json "$RAW/train.json"
else
    step train 150 "$PY" benchmarks/gpu_train.py --steps 10 --json "$RAW/train.json"
fi

DEMO_RUN="$RAW/demo"
if ((DRY)); then
    step demo 300 "$PY" -m prosparse.cli demo --out "$DEMO_RUN" eval.tasks=[] \
        "stages=[{lambda: 0.0, steps: 4}]" threshold.train=0 log.eval_every=0 \
        "threshold.sweep=[0.1, 0.2]"
else
    # lm-eval is left out (eval.tasks=[]): the before/after table is held-out perplexity and
    # sparsity, as make demo prints it.
    step demo 200 "$PY" -m prosparse.cli demo --out "$DEMO_RUN" eval.tasks=[]
fi

if ((DRY)); then
    step "2:4" 60 "$PY" benchmarks/pruning_semi_structured.py --llama2-7b-shape --layers 1 \
        --json "$RAW/semi_structured.json"
else
    step "2:4" 90 "$PY" benchmarks/pruning_semi_structured.py --llama2-7b-shape --layers 8 \
        --dtype float16 --json "$RAW/semi_structured.json"
fi

if ((DRY)); then
    step sweep 60 "$PY" benchmarks/gpu_kernel_sweep.py --json "$RAW/sweep.json"
else
    step sweep 120 "$PY" benchmarks/gpu_kernel_sweep.py --json "$RAW/sweep.json"
fi

echo "== total $((SECONDS - T0)) s"
"$PY" - "$RAW" "$OUT/gpu_check.json" "$((SECONDS - T0))" "$DRY" <<'EOF'
import json, sys, datetime, pathlib, xml.etree.ElementTree as ET
raw, out, total, dry = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
report = {"date": datetime.date.today().isoformat(), "dry_run": dry, "seconds": total,
          "steps": [json.loads(l) for l in (raw / "steps.jsonl").read_text().splitlines() if l]}
for f in sorted(raw.glob("*.json")):
    try:
        report[f.stem] = json.loads(f.read_text())
    except ValueError as e:
        report[f.stem] = {"error": f"unreadable: {e}"}
junit = raw / "tests.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [tc.get("classname", "") + "::" + tc.get("name", "") for tc in suite.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    report["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["tests"]["failed"] = failed
demo = raw / "demo" / "report.json"
if demo.is_file():
    r = json.loads(demo.read_text())
    report["demo"] = {k: r.get(k) for k in ("table", "threshold", "tokens_trained",
                                            "wall_seconds", "final", "original", "relu_swap",
                                            "mixed_precision")}
out.write_text(json.dumps(report, indent=1) + "\n")
bad = [s["step"] for s in report["steps"] if s["status"] != "ok"]
print(f"wrote {out}; steps not ok: {', '.join(bad) or 'none'}")
EOF
"$PY" benchmarks/gpu_targets.py "$OUT/gpu_check.json" --write
rm -rf "$RAW/demo/final" "$RAW/demo/data" "$RAW/demo/checkpoints" 2>/dev/null
tar -czf "$OUT/raw.tar.gz" -C "$RAW" . 2>/dev/null
rm -rf "$RAW"
