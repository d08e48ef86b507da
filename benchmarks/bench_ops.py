"""Steps (2) and (3), dense vs sparse, at LLaMA2-7B shapes; same as `prosparse bench ops`.

    flock /tmp/prosparse-cpu.lock python benchmarks/bench_ops.py --dtype bf16 --json benchmarks/results/ops_cpu_bf16.json
"""

import sys

from prosparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", *sys.argv[1:]]))
