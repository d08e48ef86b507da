"""What a GPU result ran on: device, driver, library versions, and the two ceilings every
kernel figure is read against (device-to-device copy bandwidth, bf16 matrix-product rate).

    python benchmarks/gpu_env.py --json env.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
    keys = ["name", "driver", "memory_total", "max_sm_clock", "max_mem_clock"]
    return dict(zip(keys, [v.strip() for v in out.splitlines()[0].split(",")])) if out else {}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           **{k: _version(k) for k in ("triton", "transformers", "accelerate", "safetensors")},
           "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        from prosparse.inference.benchmark import copy_bandwidth_gbps

        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), nvidia_smi=_smi(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   multiprocessors=props.multi_processor_count,
                   memory_gib=props.total_memory / 2**30,
                   l2_cache_mib=getattr(props, "L2_cache_size", 0) / 2**20,
                   copy_bandwidth_gbps=copy_bandwidth_gbps(torch.device("cuda")),
                   bf16_matmul_tflops=matmul_tflops())
    print(json.dumps(env, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(env, indent=1) + "\n")
    return 0 if torch.cuda.is_available() else 2


if __name__ == "__main__":
    sys.exit(main())
