#!/usr/bin/env bash
# The GPU half of the sparse-kernel timings, in one run on a machine with a CUDA device:
#
#     bash benchmarks/gpu_kernels.sh            # ~5-8 min on one H100/H200-class GPU
#
# 1. the sync-free Triton kernels' tests on the device (CUDA graph capture, torch.compile
#    reduce-overhead, no device-to-host sync), and the operator tests against the reference;
# 2. `bench ops --device cuda` (steps 2 and 3 against cuBLAS dense, each call captured in a
#    CUDA graph and its replay timed by device events), fp16 and bf16, LLaMA2-7B shapes
#    (4096 x 11008) and 13B shapes (5120 x 13824), sparsity 0.5 / 0.7 / 0.8932; the 0.8932 rows
#    carry the paper's 2.00x / 1.51x (7B) and 2.44x / 1.70x (13B) as `paper_speedup`;
# 3. a LLaMA2-7B-shaped greedy decode, dense vs exact sparse, both with a static KV cache under
#    torch.compile(mode="reduce-overhead").
#
# JSON goes to benchmarks/results/ (ops_cuda_*, decode_cuda_*); a step that fails is reported
# and the rest still run. bash benchmarks/gpu_check.sh measures all of this and more in one
# run (docs/results/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
failed=()
step() {  # step NAME CMD...: run, report, keep going
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@"; then echo "== $name: ok ($((SECONDS - t0)) s)"; else failed+=("$name"); echo "== $name: FAILED"; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

step tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_syncfree.py \
    tests/kernels/test_operators.py -x

for dtype in fp16 bf16; do
    step "ops 7b $dtype" "$PY" -m prosparse.cli bench ops --device cuda --dtype "$dtype" \
        --sparsity 0.5,0.7,0.8932 --reps 50 --warmup 5 --json "$OUT/ops_cuda_7b_$dtype.json"
    step "ops 13b $dtype" "$PY" -m prosparse.cli bench ops --device cuda --dtype "$dtype" \
        --d-model 5120 --d-ff 13824 --sparsity 0.5,0.7,0.8932 --reps 50 --warmup 5 \
        --json "$OUT/ops_cuda_13b_$dtype.json"
done

step "decode 7b-shape compiled" "$PY" -m prosparse.cli bench decode --llama2-7b-shape \
    --layers 8 --device cuda --dtype bf16 --compile reduce-overhead --new-tokens 128 \
    --json "$OUT/decode_cuda_llama2_7b_shape_8layers_reduce_overhead.json"

if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU steps done; JSON in $OUT"
