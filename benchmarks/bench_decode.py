"""Greedy decode dense vs sparse; same as `prosparse bench decode`.

    python benchmarks/bench_decode.py --llama2-7b-shape --layers 2 --threads 2 --repeats 5 --json benchmarks/results/decode_cpu_llama2_7b_shape_2layers.json
    python benchmarks/bench_decode.py --llama2-7b-shape --layers 2 --threads 1 --repeats 5 --json benchmarks/results/decode_cpu_llama2_7b_shape_2layers_threads1.json
    python benchmarks/bench_decode.py smollm2-135m --threshold 0.01 --threads 1 --json benchmarks/results/decode_cpu_smollm2_fatrelu0.01.json

Results: docs/results/decode.md.
"""

import sys

from prosparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
