"""PowerInfer beside prosparse on one model, what ``benchmarks/powerinfer.sh`` runs: export, convert
with PowerInfer's own scripts, decode speed (dense and sparse mode, medians), perplexity of its
sparse path (one thread) against prosparse's for the same function, and prosparse's own dense,
exact and predicted decode. PowerInfer is a checkout the user built; nothing here fetches it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from prosparse.core.errors import UsageError

# `llama_print_timings:        eval time =  1234.56 ms /    63 runs   (   19.60 ms per token,
#  51.03 tokens per second)`: the decode steps (the prompt's line says "prompt eval time").
_EVAL = re.compile(r"llama_print_timings:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs.*?"
                   r"([\d.]+) tokens per second")
_PPL = re.compile(r"\[(\d+)\]([\d.]+|nan|inf)")
_HAVE = re.compile(r"have (\d+) tokens")


def _run(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> str:
    """Run ``cmd``; its stdout and stderr together (raises with their tail when it fails)."""
    # errors="replace": a model's generated text need not be valid UTF-8. PowerInfer writes
    # llama.log / main.log into its working directory: a scratch one, not the caller's.
    with tempfile.TemporaryDirectory(prefix="powerinfer-") as scratch:
        done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, cwd=scratch,
                              env={**os.environ, **(env or {})})
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{text[-3000:]}")
    return text


def parse_eval_rate(text: str) -> float:
    """Decode tokens/s from llama.cpp's timing lines."""
    m = _EVAL.search(text)
    if m is None:
        raise RuntimeError(f"no 'eval time' line in PowerInfer's output:\n{text[-2000:]}")
    return float(m.group(3))


def parse_perplexity(text: str) -> tuple[float, int, int | None]:
    """``(perplexity, chunks, tokens)`` from ``perplexity --ppl-stride``'s running ``[i]ppl,``
    values (the last is over every chunk) and its ``have N tokens`` line."""
    values = _PPL.findall(text)
    if not values:
        raise RuntimeError(f"no perplexity values in PowerInfer's output:\n{text[-2000:]}")
    have = _HAVE.search(text)
    return float(values[-1][1]), int(values[-1][0]), int(have.group(1)) if have else None


def convert(powerinfer: Path, python: str, export: Path, out: Path, vocabtype: str,
            dense: bool = False) -> float:
    """Convert an export with PowerInfer's ``convert.py`` (sparse: model + predictors) or
    ``convert-dense.py``; returns seconds."""
    script = powerinfer / ("convert-dense.py" if dense else "convert.py")
    cmd = [python, str(script), "--vocabtype", vocabtype, "--outtype", "f16", "--outfile",
           str(out), str(export / "model")] + ([] if dense else [str(export / "predictors")])
    t = time.perf_counter()
    _run(cmd)
    return time.perf_counter() - t


def powerinfer_speed(powerinfer: Path, gguf: Path, threads: int = 2, repeats: int = 3,
                     new_tokens: int = 64, prompt: str = "The capital of France is") -> dict:
    """Greedy decode tokens/s of ``main`` (its own timing of the decode steps), median of
    ``repeats`` runs."""
    cmd = [str(Path(powerinfer).resolve() / "build" / "bin" / "main"), "-m",
           str(Path(gguf).resolve()), "-t", str(threads),
           "-n", str(new_tokens), "-c", "512", "--temp", "0", "--ignore-eos", "--seed", "0",
           "-p", prompt]
    runs = [parse_eval_rate(_run(cmd)) for _ in range(repeats)]
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "threads": threads,
            "command": shlex.join(cmd)}


def powerinfer_perplexity(powerinfer: Path, gguf: Path, text: Path, n_ctx: int, chunks: int,
                          threads: int = 1, all_neurons: bool = False) -> dict:
    """PowerInfer's perplexity on ``text`` over the chunks :func:`~prosparse.export.powerinfer.
    stride_blocks` cuts; ``all_neurons`` overrides the threshold so every neuron is kept."""
    from prosparse.export.powerinfer import perplexity_args

    cmd = [str(Path(powerinfer).resolve() / "build" / "bin" / "perplexity"), "-m",
           str(Path(gguf).resolve()), "-f", str(Path(text).resolve()),
           *perplexity_args(n_ctx), "--chunks", str(chunks), "-t", str(threads)]
    env = {"LLAMA_SPARSE_PRED_THRESHOLD": "-1e30"} if all_neurons else None
    t = time.perf_counter()
    ppl, n, tokens = parse_perplexity(_run(cmd, env))
    return {"perplexity": ppl, "chunks": n, "tokens": tokens, "threads": threads,
            "seconds": time.perf_counter() - t,
            "command": ("LLAMA_SPARSE_PRED_THRESHOLD=-1e30 " if all_neurons else "")
            + shlex.join(cmd)}


def benchmark(powerinfer: str | os.PathLike, ckpt: str, predictors: str, work: str | os.PathLike,
              *, python: str = "python3", data: str = "wiki", tokens: int = 8192,
              n_ctx: int = 256, dtype: str = "float32", decode_dtype: str | None = None,
              repeats: int = 3, new_tokens: int = 64, tolerance: float = 0.02) -> dict:
    """Everything ``benchmarks/powerinfer.sh`` reports for one model (see the module)."""
    from prosparse.export.powerinfer import export_powerinfer_dir
    from prosparse.inference.benchmark import predictor_decode_report
    from prosparse.models.loading import load_model

    powerinfer, work = Path(powerinfer).resolve(), Path(work).resolve()  # run from a scratch cwd
    for binary in ("main", "perplexity"):
        if not (powerinfer / "build" / "bin" / binary).is_file():
            raise UsageError(f"{powerinfer}/build/bin/{binary} is missing: build PowerInfer "
                             "first (cmake -S . -B build && cmake --build build --config Release)")
    work.mkdir(parents=True, exist_ok=True)
    export = export_powerinfer_dir(ckpt, predictors, work / "export", overwrite=True, data=data,
                                   tokens=tokens, n_ctx=n_ctx, dtype=dtype).report
    sparse, dense = work / "model.powerinfer.gguf", work / "model.dense.gguf"
    seconds = {"convert": convert(powerinfer, python, work / "export", sparse,
                                  export["vocabtype"]),
               "convert_dense": convert(powerinfer, python, work / "export", dense,
                                        export["vocabtype"], dense=True)}
    text = work / "export" / "heldout.txt"
    chunks = export["eval"]["chunks"]
    ppl = powerinfer_perplexity(powerinfer, sparse, text, n_ctx, chunks)
    ppl_all = powerinfer_perplexity(powerinfer, sparse, text, n_ctx, chunks, all_neurons=True)
    speed = {"dense": powerinfer_speed(powerinfer, dense, repeats=repeats, new_tokens=new_tokens),
             "sparse": powerinfer_speed(powerinfer, sparse, repeats=repeats,
                                        new_tokens=new_tokens)}
    torch.set_num_threads(2)
    model, tok = load_model(ckpt, dtype=decode_dtype or dtype)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    ours = predictor_decode_report(model, None, predictors, prompt, new_tokens=new_tokens,
                                   exact=True, repeats=repeats)
    ours.pop("predicted_tokens", None)
    mine = export["perplexity"]
    agree = abs(ppl["perplexity"] / mine["powerinfer"] - 1)
    agree_all = abs(ppl_all["perplexity"] / mine["relu_all_neurons"] - 1)
    return {
        "checkpoint": ckpt, "predictors": predictors,
        "export": {k: export[k] for k in ("activation", "activation_param", "sparse_threshold",
                                          "folded_layers", "eval", "perplexity", "average")},
        "powerinfer": {"perplexity_sparse": ppl, "perplexity_all_neurons": ppl_all,
                       "speed": speed, "seconds": seconds,
                       "same_tokens": ppl["tokens"] == export["eval"]["tokens"]},
        "agreement": {"sparse": agree, "all_neurons": agree_all, "tolerance": tolerance,
                      "ok": agree <= tolerance and agree_all <= tolerance},
        "prosparse_decode": {**ours, "dtype": decode_dtype or dtype, "threads": 2},
        "threads": {"speed": 2, "perplexity": 1},
    }


def make_7b_shaped(out: str | os.PathLike, layers: int = 4, predicted_sparsity: float = 0.89,
                   hidden: int = 1024, seed: int = 0) -> tuple[Path, Path]:
    """A random LLaMA2-7B-shaped ReLU checkpoint (``layers`` of 32, bf16) with a byte-level BPE
    tokenizer trained on ``wiki`` to its vocabulary, and random predictors whose thresholds are
    calibrated on held-out text to skip ``predicted_sparsity`` of the neurons (speed only: they
    fix how much work is done, not which neurons). Returns ``(ckpt, predictors)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prosparse.data import load_texts
    from prosparse.inference.decode import llama2_7b_shaped
    from prosparse.inference.predicted import calibrate_thresholds_
    from prosparse.models.relufy import relufy_
    from prosparse.models.saving import save_model
    from prosparse.predictors.export import save_predictors
    from prosparse.predictors.model import PredictorSet

    out = Path(out)
    model = llama2_7b_shaped(layers, torch.bfloat16, seed)
    relufy_(model, "relu")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=model.config.vocab_size,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(load_texts("wiki", "train")[:3000], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    ckpt = save_model(model, tok, out / "ckpt", overwrite=True)
    text = " ".join(load_texts("wiki", "heldout")[:20])
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    torch.manual_seed(seed + 1)
    pset = PredictorSet(4096, 11008, layers, hidden).eval()  # fp32; attached in the model's dtype
    calibrate_thresholds_(model, pset, ids, predicted_sparsity)
    pred = save_predictors(pset, out / "pred", overwrite=True,
                           extra={"model": str(ckpt), "calibrated_sparsity": predicted_sparsity})
    (out / "made.json").write_text(json.dumps({"layers": layers, "thresholds":
                                               pset.thresholds.tolist()}) + "\n")
    return ckpt, pred


def readme_section(reports: dict[str, dict]) -> str:
    """The README section: prosparse's own dense / exact / predicted decode beside PowerInfer's
    dense and sparse modes (tokens/s), then PowerInfer's perplexity against prosparse's for the
    same function, one row per model."""
    head = ("| model | prosparse dense | prosparse exact sparse | prosparse predicted | "
            "PowerInfer dense (SiLU) | PowerInfer sparse | predicted sparsity % |")
    lines = ["### PowerInfer (`prosparse export powerinfer`, `benchmarks/powerinfer.sh`)", "",
             "Greedy decode tokens/s on this machine's CPU, 2 threads, median of 3 runs of 64 "
             "tokens; prosparse through transformers, PowerInfer from a CPU build of its public "
             "source converted by its own `convert.py` (f16). PowerInfer's dense mode computes "
             "SiLU whatever the checkpoint says (a speed baseline, not this model); its sparse "
             "mode computes ReLU on the predicted neurons.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in reports.items():
        d, s = r["prosparse_decode"], r["powerinfer"]["speed"]
        lines.append(
            f"| {name} | {d['dense_tokens_per_s']:.1f} | {d['exact_tokens_per_s']:.1f} | "
            f"{d['predicted_tokens_per_s']:.1f} | {s['dense']['tokens_per_s']:.1f} | "
            f"{s['sparse']['tokens_per_s']:.1f} | "
            f"{100 * r['export']['average']['effective_predicted_sparsity']:.2f} |")
    head = ("| model | tokens | prosparse: PowerInfer's function | PowerInfer sparse (1 thread) "
            "| diff % | prosparse: ReLU, all neurons | PowerInfer, all neurons | diff % |")
    lines += ["", "Held-out perplexity of what PowerInfer computes, prosparse (fp32) beside "
              "PowerInfer (f16, 1 thread: its multi-threaded sparse down projection is racy) on "
              "the same tokens (`heldout.txt` of the export, every prediction of 256-token "
              "chunks scored); \"all neurons\" keeps every neuron "
              "(`LLAMA_SPARSE_PRED_THRESHOLD=-1e30`):", "",
              head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in reports.items():
        pi, mine = r["powerinfer"], r["export"]["perplexity"]
        a, b = pi["perplexity_sparse"]["perplexity"], pi["perplexity_all_neurons"]["perplexity"]
        lines.append(
            f"| {name} | {r['export']['eval']['scored_tokens']} | {mine['powerinfer']:.3f} | "
            f"{a:.3f} | {100 * (a / mine['powerinfer'] - 1):+.2f} | "
            f"{mine['relu_all_neurons']:.3f} | {b:.3f} | "
            f"{100 * (b / mine['relu_all_neurons'] - 1):+.2f} |")
    return "\n".join(lines) + "\n"


def cli(argv: list[str]) -> int:
    """``benchmarks/powerinfer.sh``'s entry: POWERINFER_DIR CKPT PRED NAME WORK."""
    import argparse

    from prosparse.core.io import write_json

    p = argparse.ArgumentParser(prog="benchmarks/powerinfer.sh")
    p.add_argument("powerinfer")
    p.add_argument("ckpt", help="checkpoint, or 7b-shaped to build one")
    p.add_argument("predictors", nargs="?", default=None)
    p.add_argument("--name", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--python", default="python3", help="python for PowerInfer's converter")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode-dtype", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args(argv)
    ckpt, pred = args.ckpt, args.predictors
    if ckpt == "7b-shaped":
        ckpt, pred = (str(x) for x in make_7b_shaped(Path(args.work) / "7b", args.layers))
    if pred is None:
        raise SystemExit("give PRED (predictors trained on CKPT)")
    report = benchmark(args.powerinfer, ckpt, pred, args.work, python=args.python,
                       tokens=args.tokens, n_ctx=args.seq_len, dtype=args.dtype,
                       decode_dtype=args.decode_dtype)
    results = Path(args.results)
    write_json(results / f"powerinfer_{args.name}.json", report)
    reports = {f.stem.removeprefix("powerinfer_"): json.loads(f.read_text())
               for f in sorted(results.glob("powerinfer_*.json"))}
    (results / "powerinfer_README_section.md").write_text(readme_section(reports))
    print(readme_section({args.name: report}))
    a = report["agreement"]
    print(f"perplexity PowerInfer vs prosparse: {100 * a['sparse']:.2f}% apart (all neurons "
          f"{100 * a['all_neurons']:.2f}%); tolerance {100 * a['tolerance']:.0f}%: "
          f"{'ok' if a['ok'] else 'FAILED'}")
    return 0 if a["ok"] else 1
