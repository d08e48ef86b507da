"""``prosparse bench ops`` JSON keys on a tiny shape."""

from __future__ import annotations

import json

from prosparse.cli import bench as commands
from prosparse.kernels import fused


def test_bench_ops_json(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "ops.json"
    args = parser.parse_args(["bench", "ops", "--d-model", "64", "--d-ff", "171", "--sparsity",
                              "0.5,0.9", "--dtype", "fp32", "--reps", "3", "--warmup", "1",
                              "--batch", "1,2", "--json", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and isinstance(report["device"], str)
    assert report["cpu_isa"] == fused.cpu_isa()  # which VM the ratios came from
    assert len(report["results"]) == 8
    for r in report["results"]:
        assert {"step", "sparsity", "dense_us", "sparse_us", "speedup", "gbps", "bound"} <= set(r)
        assert r["step"] in (2, 3) and r["dense_us"] > 0 and r["sparse_us"] > 0
    assert {r["sparsity"] for r in report["results"]} == {0.5, 0.9}
    assert report["results"][1]["bound"] == 2.0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "cache" in printed
