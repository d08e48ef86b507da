"""Greedy decode dense vs sparse; same as `prosparse bench decode`.

    flock /tmp/prosparse-cpu.lock python benchmarks/bench_decode.py --llama2-7b-shape --layers 2 --threads 2 --repeats 5 --json benchmarks/results/decode_cpu_llama2_7b_shape_2layers.json
    flock /tmp/prosparse-cpu.lock python benchmarks/bench_decode.py --llama2-7b-shape --layers 2 --threads 1 --repeats 5 --json benchmarks/results/decode_cpu_llama2_7b_shape_2layers_threads1.json
    flock /tmp/prosparse-cpu.lock python benchmarks/bench_decode.py DIR --json benchmarks/results/decode_smollm2_cpu.json
"""

import sys

from prosparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
