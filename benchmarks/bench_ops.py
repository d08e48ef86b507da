"""Steps (2) and (3), dense vs sparse, at LLaMA2-7B shapes; same as `prosparse bench ops`.

The committed CPU figures (fused kernels, pure torch and dense in one run):

    python benchmarks/bench_ops.py --dtype bf16 --threads 1 --json benchmarks/results/ops_cpu_bf16.json
    python benchmarks/bench_ops.py --dtype bf16 --threads 2 --json benchmarks/results/ops_cpu_bf16_threads2.json
    python benchmarks/bench_ops.py --dtype fp32 --threads 1 --json benchmarks/results/ops_cpu_fp32.json
    python benchmarks/bench_ops.py --dtype fp32 --threads 2 --json benchmarks/results/ops_cpu_fp32_threads2.json

A variant of the compiled kernels (docs/kernels.md), beside dense, e.g. one row per pass in step 2:

    PROSPARSE_CPU_CFLAGS=-DPROSPARSE_UP_ROWS=1 python benchmarks/bench_ops.py --target-sparsity 0.8932 --backend fused

Results: docs/results/kernels.md.
"""

import sys

from prosparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", *sys.argv[1:]]))
