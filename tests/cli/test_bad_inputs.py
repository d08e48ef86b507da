"""Every command, fed a bad input, ends in one line on stderr naming the value, exit 2, no
traceback, and leaves its output location as it was: all before any work starts.

Each row is ``(command line, text the message must contain)``. In command lines ``{model}`` is a
tiny saved Llama, ``{text}`` a small corpus, ``{pairs}`` / ``{pred}`` a predictor collection and
trained predictors, ``{otherpred}`` predictors for another model shape, ``{result}`` a
``prosparse eval --json`` file, ``{recipe}`` a valid recipe; ``{tmp}`` is the test's own folder,
holding ``taken/`` (a folder prosparse did not write), ``file`` (a plain file), ``dir/`` (an
empty folder), ``binary.bin``, ``bad.yaml``, ``nosteps.yaml``.
Outputs go under ``{tmp}``, which must look the same afterwards.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from prosparse import save_model
from prosparse.cli import main

NO_CUDA = not torch.cuda.is_available()

CASES = [
    # convert
    ("convert {model} --threshold nan --out {tmp}/o", "'nan' is not a finite number"),
    ("convert {model} --threshold inf --out {tmp}/o", "'inf' is not a finite number"),
    ("convert {model} --threshold -1 --out {tmp}/o", "'-1' is not a threshold >= 0"),
    ("convert {model} --threshold 1e300 --out {tmp}/o", "'1e300' does not fit in float32"),
    ("convert {model} --shift nan --out {tmp}/o", "'nan' is not a finite number"),
    ("convert {model} --act shifted_relu --threshold 0.1 --out {tmp}/o",
     "--threshold 0.1 applies to --act fatrelu"),
    ("convert {model} --act fatrelu --shift 0.1 --out {tmp}/o",
     "--shift 0.1 applies to --act shifted_relu"),
    ("convert {model} --threshold 0.1 --shift 0.1 --out {tmp}/o", "name two activations"),
    ("convert {model} --dtype fp8 --out {tmp}/o", "invalid choice: 'fp8'"),
    ("convert {model} --out {tmp}/taken", "taken already exists"),
    ("convert {model} --out {tmp}/taken --overwrite", "not written by prosparse"),
    ("convert {model} --out {tmp}/file/o", "is a file, not a folder"),
    ("convert {tmp}/nowhere --out {tmp}/o", "no model at"),
    ("convert {tmp}/truncated --out {tmp}/o", "model.safetensors is truncated or corrupt"),
    ("convert {tmp}/badconfig --out {tmp}/o", "config.json is not valid JSON"),
    ("convert {model}", "the following arguments are required: --out"),
    # sparsity
    ("sparsity {model} --tokens 0 --data {text}", "'0' is not a positive integer"),
    ("sparsity {model} --tokens -5 --data {text}", "'-5' is not a positive integer"),
    ("sparsity {model} --tokens 1.5 --data {text}", "'1.5' is not a positive integer"),
    ("sparsity {model} --seq-len 1 --data {text}", "'1' is too short a block"),
    ("sparsity {model} --batch-size 0 --data {text}", "'0' is not a positive integer"),
    ("sparsity {model} --data {tmp}/nope.txt", "no data at"),
    ("sparsity {model} --data {tmp}/binary.bin", "binary.bin is binary, not text"),
    ("sparsity {model} --data =x", "must look like NAME=PATH"),
    ("sparsity {model} --data {text} --json {tmp}/dir", "dir is a folder"),
    ("sparsity {model} --data {text} --plot {tmp}/file/p.png", "is a file, not a folder"),
    ("sparsity {model} --data {text} --act relu --threshold nan", "'nan' is not a finite"),
    # threshold
    ("threshold {model} --data {text} --thresholds 0,nan,inf", "'nan' is not a finite number"),
    ("threshold {model} --data {text} --thresholds 0,-1", "'-1' is not a threshold >= 0"),
    ("threshold {model} --data {text} --thresholds 0,,1", "'0,,1' is not a comma-separated"),
    ("threshold {model} --data {text} --thresholds 1e300", "'1e300' does not fit in float32"),
    ("threshold {model} --data {text} --tolerance -0.1", "'-0.1' is not a finite number >= 0"),
    ("threshold {model} --data {text} --tolerance nan", "'nan' is not a finite number"),
    ("threshold {model} --data {text} --json {tmp}/dir", "dir is a folder"),
    # schedule and train: recipe errors
    ("schedule {tmp}/none.yaml", "no recipe at"),
    ("schedule {tmp}/bad.yaml", "is not valid YAML at line 4, column 6"),
    ("schedule {tmp}/nosteps.yaml", "stages.0 has no steps"),
    ("schedule {recipe} optim.lr.foo=1", "optim.lr is a single value (float)"),
    ("schedule {recipe} checkpoint.every=-5", "checkpoint.every: -5 is not an integer >= 0"),
    ("schedule {recipe} batch_size=true", "batch_size must be an integer, got True"),
    ("schedule {recipe} optim.lr=nan", "optim.lr must be a finite number"),
    ("schedule {recipe} optim.lrr=1", "unknown recipe key 'optim.lrr'"),
    ("schedule {recipe} stages.1.steps=5", "stages[1].steps (5) must be greater than"),
    ("schedule {recipe} --every 0", "is not a positive integer"),
    ("train {tmp}/bad.yaml --out {tmp}/run", "is not valid YAML"),
    ("train {tmp}/nosteps.yaml --out {tmp}/run", "stages.0 has no steps"),
    ("train {recipe} optim.lr.foo=1 --out {tmp}/run", "optim.lr is a single value (float)"),
    ("train {recipe} checkpoint.every=-5 --out {tmp}/run", "checkpoint.every: -5"),
    ("train {recipe} batch_size=true --out {tmp}/run", "batch_size must be an integer"),
    ("train {recipe} data.seq_len=0 --out {tmp}/run", "data.seq_len: 0 is not a positive"),
    ("train {recipe} threshold.sweep=[0.1,nan] --out {tmp}/run", "threshold.sweep.1"),
    ("train {recipe} activation=frelu --out {tmp}/run", "unknown activation 'frelu'"),
    ("train {recipe} optim.lr --out {tmp}/run", "must look like KEY=VALUE"),
    # fit-lambda
    ("fit-lambda --target 100", "target sparsity 100.0% is outside"),
    ("fit-lambda --target nan", "target sparsity nan% is outside"),
    ("fit-lambda --target 0.89", "Is it a fraction? Pass percent"),
    ("fit-lambda --predict -1", "lambda (-1.0) must be a finite number >= 0"),
    ("fit-lambda --predict inf", "lambda (inf) must be a finite number >= 0"),
    ("fit-lambda --point 0.1:80", "at least 2 measured"),
    ("fit-lambda --point 0.1:80 --point 0.2:120", "percentages in [0, 100)"),
    # eval, eval-table
    ("eval {model} --limit 0", "'0' is not a positive integer"),
    ("eval {model} --num-fewshot -1", "'-1' is not an integer >= 0"),
    ("eval {model} --batch-size 0", "'0' is not a positive integer"),
    ("eval {model} --tasks ,", "--tasks is empty"),
    ("eval {model} --tasks not_a_task", "not_a_task"),
    ("eval {model} --tasks piqa --variants bogus", "unknown variant 'bogus'"),
    ("eval {model} --tasks piqa --variants fatrelu:nan", "'nan' is not a finite number"),
    ("eval {model} --tasks piqa --sparsity --data {tmp}/nope.txt", "no data at"),
    ("eval {model} --tasks piqa --data {text}", "--data is the text for --measure-sparsity"),
    ("eval {model} --tasks piqa --measure-sparsity --data {tmp}/nope.txt", "no data at"),
    ("eval {model} --tasks piqa --tokens 0", "'0' is not a positive integer"),
    ("eval {model} --tasks piqa --sparsity-tokens 0", "'0' is not a positive integer"),
    ("eval {model} --tasks piqa --data-root {tmp}/nowhere", "is not a folder"),
    ("eval {model} --json {tmp}/dir", "dir is a folder"),
    ("eval-table {tmp}/none.json", "result file"),
    ("eval-table {tmp}/file", "is not JSON"),
    ("eval-table {text}", "is not JSON"),
    ("eval-table a={result} --sparsity b=0.5", "unknown setting 'b'"),
    ("eval-table a={result} --sparsity a=1.5", "must be a fraction in [0, 1]"),
    ("eval-table a={result} --sparsity a=lots", "neither a number nor"),
    ("eval-table a={result} --json {tmp}/dir", "dir is a folder"),
    ("eval-table a={result} --label-sparsity a=1.5", "must be a fraction in [0, 1]"),
    # bench ops, bench decode
    ("bench ops --d-ff 0", "'0' is not a positive integer"),
    ("bench ops --d-model -1", "'-1' is not a positive integer"),
    ("bench ops --sparsity 1.5", "'1.5' is not a fraction in [0, 1]"),
    ("bench ops --sparsity 0.5,nan", "'nan' is not a fraction"),
    ("bench ops --sparsity 50", "is it a percentage? use 0.5"),
    ("bench ops --batch 0", "'0' is not a positive integer"),
    ("bench ops --reps 0", "'0' is not a positive integer"),
    ("bench ops --warmup -1", "'-1' is not an integer >= 0"),
    ("bench ops --target-sparsity 50", "is it a percentage? use 0.5"),
    ("bench ops --batch-size 0", "'0' is not a positive integer"),
    ("bench ops --repeats 0", "'0' is not a positive integer"),
    ("bench ops --dtype float8", "invalid choice: 'float8'"),
    ("bench ops --threads 0", "'0' is not a positive integer"),
    ("bench ops --dtype fp8", "invalid choice: 'fp8'"),
    ("bench ops --backend fast", "invalid choice: 'fast'"),
    ("bench ops --json {tmp}/dir", "dir is a folder"),
    ("bench decode {model} --new-tokens 0", "'0' is not a positive integer"),
    ("bench decode {model} --repeats 0", "'0' is not a positive integer"),
    ("bench decode {model} --threshold nan", "'nan' is not a finite number"),
    ("bench decode {model} --llama2-7b-shape", "give either MODEL or --llama2-7b-shape"),
    ("bench decode --llama2-7b-shape --sparsity 2", "'2' is not a fraction"),
    ("bench decode --llama2-7b-shape --layers 0", "'0' is not a positive integer"),
    ("bench decode --llama2-7b-shape --target-sparsity 2", "'2' is not a fraction"),
    ("bench decode --llama2-7b-shape --predicted-sparsity -0.1", "'-0.1' is not a fraction"),
    ("bench decode {model} --predictors {tmp}/nowhere", "no predictor folder"),
    ("bench decode {model} --predictors {otherpred}", "are for 3 layers, d_model 64, d_ff 256"),
    ("bench decode {model} --json {tmp}/file/d.json", "is a file, not a folder"),
    # predictors
    ("predictors collect {model} --act relu --data {text} --clip-top 0 --out {tmp}/o",
     "must be a fraction in (0, 1], not 0"),
    ("predictors collect {model} --act relu --data {text} --clip-top 1.5 --out {tmp}/o",
     "'1.5' is not a fraction"),
    ("predictors collect {model} --act relu --data {text} --tokens 0 --out {tmp}/o",
     "'0' is not a positive integer"),
    ("predictors collect {model} --act relu --data {text} --shard-tokens 0 --out {tmp}/o",
     "'0' is not a positive integer"),
    ("predictors collect {model} --act relu --data {tmp}/nope.txt --out {tmp}/o", "no data at"),
    ("predictors collect {model} --act relu --data {text} --out {tmp}/taken", "taken already"),
    ("predictors train {tmp}/dir --out {tmp}/o", "meta.json not found"),
    ("predictors train {pairs} --hidden 0 --out {tmp}/o", "'0' is not a positive integer"),
    ("predictors train {pairs} --epochs -1 --out {tmp}/o", "'-1' is not an integer >= 0"),
    ("predictors train {pairs} --lr 0 --out {tmp}/o", "'0' is not a finite number > 0"),
    ("predictors train {pairs} --lr nan --out {tmp}/o", "'nan' is not a finite number"),
    ("predictors train {pairs} --target-recall 1.5 --out {tmp}/o", "'1.5' is not a fraction"),
    ("predictors train {pairs} --layers 3-1 --out {tmp}/o", "'3-1' is not a layer list"),
    ("predictors train {pairs} --layers 7 --out {tmp}/o", "--layers [7] are not in"),
    ("predictors train {pairs} --out {tmp}/taken", "taken already exists"),
    ("predictors train {pairs} --out {tmp}/o --json {tmp}/dir", "dir is a folder"),
    ("predictors train {pairs} --config {tmp}/bad.yaml --out {tmp}/o",
     "is not valid YAML at line 4, column 6"),
    ("predictors train {pairs} --config {tmp}/none.yaml --out {tmp}/o",
     "no predictor training config at"),
    ("predictors train {pairs} hiden=8 --out {tmp}/o", "unknown predictor training config key"),
    ("predictors train {pairs} hidden=0 --out {tmp}/o", "hidden (0) must be at least 1"),
    ("predictors eval {tmp}/nowhere {pairs}", "no predictor folder"),
    ("predictors eval {tmp}/dir {pairs}", "holds neither predictors.json"),
    ("predictors eval {pred} {tmp}/dir", "meta.json not found"),
    ("predictors eval {pred} {pairs} --plot {tmp}/dir", "dir is a folder"),
    ("predictors calibrate {pred} {pairs} --target-recall 0 --out {tmp}/o", "not 0"),
    ("predictors calibrate {pred} {pairs} --target-recall nan --out {tmp}/o", "'nan' is not"),
    ("predictors calibrate {pred} {pairs} --target-recall 0.9 --out {tmp}/taken", "taken"),
    ("predictors calibrate {tmp}/nowhere {pairs} --target-recall 0.9 --out {tmp}/o",
     "no predictor folder"),
    ("predictors export {pred}", "give --powerinfer DIR and/or --out DIR"),
    ("predictors export {tmp}/nowhere --out {tmp}/o", "no predictor folder"),
    ("predictors export {pred} --out {tmp}/taken", "taken already exists"),
    ("predictors export {pred} --powerinfer {tmp}/o --out {tmp}/o", "give two folders"),
    # prune
    ("prune {model} --config {tmp}/bad.yaml --out {tmp}/o", "is not valid YAML at line 4"),
    ("prune {model} --config {tmp}/none.yaml --out {tmp}/o", "no pruning config at"),
    ("prune {model} lambada=1 --out {tmp}/o", "unknown setting 'lambada'"),
    ("prune lambda=oops --out {tmp}/o", "prox.lambda must be a number"),
    ("prune {model} --dtype fp8 --out {tmp}/o", "invalid choice: 'fp8'"),
    ("prune {model} --seq-len 1 --out {tmp}/o", "'1' is too short a block"),
    ("prune {model} --method magnitude --out {tmp}/taken", "taken already exists"),
    # generate
    ("generate {tmp}/nowhere --prompt hi", "no model at"),
    ("generate {model} --prompt ''", "--prompt is empty"),
    ("generate {model} --prompt '  '", "--prompt is empty"),
    ("generate {model}", "the following arguments are required: --prompt"),
    ("generate {model} --prompt hi --max-new-tokens 0", "'0' is not a positive integer"),
    ("generate {model} --prompt hi --predictors {otherpred}",
     "are for 3 layers, d_model 64, d_ff 256"),
    ("generate {model} --prompt hi --predictors {tmp}/nowhere", "no predictor folder"),
    ("generate {model} --prompt hi --predictors {tmp}/dir", "holds neither predictors.json"),
    ("generate {model} --prompt hi --dense --predictors {pred}", "name two FFN paths"),
    ("generate {model} --prompt hi --top-p 0.9", "--top-p and --seed shape sampling"),
    ("generate {model} --prompt hi --seed 1", "--top-p and --seed shape sampling"),
    ("generate {model} --prompt hi --temperature -1", "'-1' is not a finite number >= 0"),
    ("generate {model} --prompt hi --temperature 1 --top-p 0", "not 0"),
    ("generate {model} --prompt hi --threshold nan", "'nan' is not a finite number"),
    ("generate {model} --prompt hi --dtype fp8", "invalid choice: 'fp8'"),
    ("generate {model} --prompt hi --backend fast", "invalid choice: 'fast'"),
    ("generate {model} --prompt hi --json {tmp}/dir", "dir is a folder"),
    ("generate {model} --prompt hi --predictors {pred}", "--predictors needs a ReLU-family"),
    # demo
    ("demo --recipe {tmp}/none.yaml --out {tmp}/run", "demo recipe"),
    ("demo optim.lr=nan --out {tmp}/run", "optim.lr must be a finite number"),
    ("demo batch_size=0 --out {tmp}/run", "batch_size: 0 is not a positive integer"),
    ("demo --recipe {tmp}/bad.yaml --out {tmp}/run", "is not valid YAML"),
    ("demo --resume --overwrite --out {tmp}/run", "pass one of them"),
]
if NO_CUDA:
    CASES += [
        ("convert {model} --device cuda --out {tmp}/o", "'cuda' asked for but CUDA is not"),
        ("sparsity {model} --device cuda:0 --data {text}", "'cuda:0' asked for but CUDA"),
        ("bench ops --device cuda", "'cuda' asked for but CUDA is not available"),
        ("predictors train {pairs} --device cuda --out {tmp}/o", "CUDA is not available"),
        ("generate {model} --prompt hi --device cuda", "'cuda' asked for but CUDA is not"),
    ]
CASES += [("sparsity {model} --device tpu9 --data {text}", "'tpu9'")]
CASES += [
    # export powerinfer
    ("export powerinfer {tmp}/nowhere --predictors {tmp}/dir --out {tmp}/o", "no model at"),
    ("export powerinfer {model} --out {tmp}/o", "only through its predictors"),
    ("export powerinfer {model} --dtype fp8 --out {tmp}/o", "invalid choice: 'fp8'"),
    # files that do not load, outputs that are inputs
    ("sparsity {tmp}/binary.bin --data {text}", "no model at"),
    ("sparsity {model} --data {text} --json {text}", "also an input of this command"),
    ("sparsity {model} --data {text} --json {tmp}/file", "not written by prosparse"),
    ("sparsity {model} --data {text} --plot {tmp}/layers.csv", "matplotlib cannot write"),
    ("sparsity {model} --data {text} --ppl-tolerance 0", "is not a finite number > 0"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The inputs every case reads: built once (a collection and predictors take seconds)."""
    from tests.conftest import char_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("shared")
    model = save_model(tiny_llama(), char_tokenizer(), root / "tiny")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"alpha beta gamma {i} delta sparse relu token." * 3
                                for i in range(60)))
    pairs, pred = root / "pairs", root / "pred"
    assert main(["predictors", "collect", str(model), "--act", "relu", "--data", str(text),
                 "--tokens", "512", "--seq-len", "64", "--out", str(pairs)]) == 0
    assert main(["predictors", "train", str(pairs), "--out", str(pred), "--hidden", "8",
                 "--epochs", "0"]) == 0
    from prosparse.predictors.export import save_predictors
    from prosparse.predictors.model import PredictorSet

    otherpred = save_predictors(PredictorSet(64, 256, 3, hidden=8), root / "otherpred")
    result = root / "result.json"
    result.write_text(json.dumps({"model": "m", "tasks": {"piqa": 0.6}, "groups": {},
                                  "average": 0.6}))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {model}\nstages:\n  - {{lambda: 0, steps: 10}}\n"
                      "  - {lambda: 0.1, steps: 20}\ndata:\n  seq_len: 32\n")
    return {"model": model, "text": text, "pairs": pairs, "pred": pred, "result": result,
            "recipe": recipe, "otherpred": otherpred}


def _layout(tmp) -> dict:
    """Every path under ``tmp`` with its size (a file) or None (a folder)."""
    return {str(p.relative_to(tmp)): (p.stat().st_size if p.is_file() else None)
            for p in sorted(tmp.rglob("*"))}


@pytest.mark.parametrize("line,expected", CASES, ids=[c[0].split(" {")[0] + ": " + c[0]
                                                    for c in CASES])
def test_bad_input_is_one_line_before_any_work(line, expected, shared, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # unknown tasks: no hub lookup
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("not json")
    (tmp_path / "dir").mkdir()
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\x02text")
    (tmp_path / "bad.yaml").write_text("model: x\nstages:\n  - {lambda: 0, steps: 10\n"
                                       "optim: {lr: 1}\n")
    (tmp_path / "nosteps.yaml").write_text("stages:\n  - {lambda: 0}\n")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in shared["model"].iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    bad_config = tmp_path / "badconfig"
    bad_config.mkdir()
    for f in shared["model"].iterdir():
        (bad_config / f.name).write_bytes(f.read_bytes())
    (bad_config / "config.json").write_text("{not json")
    before = _layout(tmp_path)
    argv = shlex.split(line.format(tmp=tmp_path, **shared))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses while parsing
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("prosparse ") and ": error: " in lines[0], lines[0]
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert _layout(tmp_path) == before, "the command changed its output location"
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_the_table_covers_every_command():
    commands = {" ".join(w for w in c[0].split()[:2] if not w.startswith("{")) for c in CASES}
    want = {"convert", "sparsity", "threshold", "schedule", "train", "fit-lambda", "eval",
            "eval-table", "bench ops", "bench decode", "predictors collect", "predictors train",
            "predictors eval", "predictors calibrate", "predictors export", "prune", "generate",
            "demo"}
    assert want <= {c.split()[0] if c.split()[0] not in ("bench", "predictors") else c
                    for c in commands}
    assert len(CASES) >= 60
