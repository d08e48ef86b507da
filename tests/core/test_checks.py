"""The shared validators (prosparse.core.checks), the self-repairing model cache, text sniffing, and
shifted ReLU through convert / save / load."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest

from prosparse import UsageError, load_model, save_model
from prosparse.cli import main
from prosparse.core import checks
from prosparse.data import load_texts
from prosparse.models import loading
from prosparse.models.relufy import current_activation, find_gated_ffns


@pytest.mark.parametrize("check,good,bad", [
    (checks.positive_int, [("1", 1), ("4096", 4096), (3.0, 3)],
     ["0", "-5", "1.5", "nan", "x", True]),
    (checks.nonneg_int, [("0", 0), ("7", 7)], ["-1", "0.5", "inf"]),
    (checks.finite_float, [("-2.5", -2.5), ("1e-4", 1e-4)], ["nan", "inf", "-inf", "one"]),
    (checks.nonneg_float, [("0", 0.0), ("3", 3.0)], ["-0.1", "nan"]),
    (checks.positive_float, [("1e-3", 1e-3)], ["0", "-1", "inf"]),
    (checks.fraction, [("0", 0.0), ("1", 1.0), ("0.8932", 0.8932)], ["1.5", "-0.1", "nan", "50"]),
    (checks.open_fraction, [("1", 1.0), ("0.95", 0.95)], ["0", "1.01"]),
    (checks.threshold, [("0", 0.0), ("0.01", 0.01)], ["-1", "nan", "inf", "1e300"]),
    (checks.act_scalar, [("-0.5", -0.5), ("3e38", 3e38)], ["1e39", "nan"]),
])
def test_number_validators_accept_and_refuse(check, good, bad):
    for text, value in good:
        assert check(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text) if isinstance(text, str)
                           else "True"):
            check(text)


def test_percent_given_for_a_fraction_gets_a_hint():
    with pytest.raises(argparse.ArgumentTypeError, match=r"percentage\? use 0.5"):
        checks.fraction("50")


def test_comma_lists_check_every_item_and_name_the_bad_one():
    parse = checks.comma_list(checks.threshold, "0,0.01")
    assert parse("0, 0.005,0.01") == (0.0, 0.005, 0.01)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'inf' is not a finite number.*in "
                                                         r"'0,inf'"):
        parse("0,inf")
    for text in ("", "0,,1", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated list"):
            parse(text)


def test_device_refuses_cuda_without_cuda_and_nonsense(monkeypatch):
    import torch

    assert checks.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available here"):
        checks.device("cuda:1")
    with pytest.raises(argparse.ArgumentTypeError, match="not a torch device"):
        checks.device("gpu please")


def test_output_checks_create_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert checks.output_file(str(target)) == target
    assert not (tmp_path / "a").exists()
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        checks.output_file(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a folder"):
        checks.output_file(str(tmp_path / "f" / "out.json"))
    with pytest.raises(UsageError, match="is a file"):
        checks.check_output_dir(tmp_path / "f")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        checks.check_output_dir(tmp_path / "d")
    assert checks.check_output_dir(tmp_path / "new") == tmp_path / "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_location_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(argparse.ArgumentTypeError, match="not writable"):
            checks.output_file(str(ro / "x.json"))
    finally:
        ro.chmod(0o700)


def test_check_field_names_the_recipe_key():
    with pytest.raises(UsageError, match=r"^checkpoint.every: -5 is not an integer >= 0$"):
        checks.check_field("checkpoint.every", -5, checks.nonneg_int)
    assert checks.check_field("optim.lr", 3e-4, checks.positive_float) == 3e-4


def test_cli_prints_usage_errors_only_and_keeps_bugs(monkeypatch, capsys):
    from prosparse.sparsity import fit

    monkeypatch.setattr(fit.SparsityFit, "lam", lambda self, s: {}["bug"])
    with pytest.raises(KeyError):  # a bug is not a usage error: its traceback stays
        main(["fit-lambda", "--target", "89"])
    monkeypatch.undo()
    assert main(["fit-lambda", "--target", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prosparse fit-lambda: error: target sparsity 100.0%")
    assert err.count("\n") == 1


# --- the dequantised cache ----------------------------------------------------------------------


def test_corrupt_cache_is_detected_and_rebuilt(llama, tokenizer, tmp_path, monkeypatch):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setenv("PROSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "embedded_model_path", lambda name: gguf)
    built = []

    def dequantise(source, **kwargs):  # stands in for the 20 s GGUF read
        built.append(source)
        return llama

    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", dequantise)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    target = loading._embedded_cached("smollm2-135m")
    sums = json.loads((target / loading.CHECKSUMS).read_text())
    assert "model.safetensors" in sums and "config.json" in sums and len(built) == 1
    assert loading._embedded_cached("smollm2-135m") == target and len(built) == 1  # intact
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: same size, same header
    weights.write_bytes(bytes(data))
    assert loading._embedded_cached("smollm2-135m") == target and len(built) == 2  # rebuilt
    assert loading._cache_is_intact(target)
    (target / loading.CHECKSUMS).unlink()  # a copy from before checksums is not trusted
    assert loading._embedded_cached("smollm2-135m") == target and len(built) == 3


def test_truncated_checkpoint_names_the_file(llama, tokenizer, tmp_path):
    out = save_model(llama, tokenizer, tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UsageError, match=r"m/model.safetensors is truncated or corrupt .*re-run "
                                         r"`prosparse convert` \(or re-download"):
        load_model(str(out))
    weights.write_bytes(b"\x05")
    with pytest.raises(UsageError, match="no complete safetensors header"):
        load_model(str(out))


# --- any text file is data ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LICENSE", "notes.md", "README", "data.csv", "corpus.txt"])
def test_any_text_file_is_data(tmp_path, name):
    path = tmp_path / name
    path.write_text("First document, with ünïcödé.\n\nSecond document.\n")
    assert load_texts(str(path), "all") == ["First document, with ünïcödé.", "Second document."]


def test_binary_and_non_utf8_files_are_refused_by_name(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(UsageError, match=r"model.bin is binary, not text"):
        load_texts(str(tmp_path / "model.bin"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.txt is not UTF-8 text \(byte 3\)"):
        load_texts(str(tmp_path / "latin1.txt"))


def test_a_folder_reads_every_text_file_and_skips_hidden_ones(tmp_path):
    (tmp_path / "LICENSE").write_text("license text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("markdown text")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_bytes(b"\x00\x01")
    assert sorted(load_texts(str(tmp_path), "all")) == ["license text", "markdown text"]


# --- shifted ReLU at both ends ------------------------------------------------------------------


def test_shifted_relu_round_trips_through_convert_save_load(llama, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny = save_model(llama, tokenizer, tmp_path / "tiny")
    out = tmp_path / "S"
    assert main(["convert", str(tiny), "--act", "shifted_relu", "--shift", "0.1",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_act"] == "shifted_relu" and cfg["hidden_act_param"] == 0.1
    model, _ = load_model(str(out))
    assert current_activation(model) == ("shifted_relu", 0.1)
    plain = AutoModelForCausalLM.from_pretrained(str(out))  # transformers alone, prosparse imported
    assert all(math.isclose(float(f.act.shift), 0.1, rel_tol=1e-6)
               for f in find_gated_ffns(plain))
    again = save_model(model, tokenizer, tmp_path / "S2")
    assert current_activation(load_model(str(again))[0]) == ("shifted_relu", 0.1)


def test_sparsity_measures_a_shifted_checkpoint(llama, tokenizer, text_file, tmp_path):
    tiny = save_model(llama, tokenizer, tmp_path / "tiny")
    out, js = tmp_path / "S", tmp_path / "s.json"
    assert main(["convert", str(tiny), "--shift", "0.1", "--out", str(out)]) == 0
    assert main(["sparsity", str(out), "--data", str(text_file), "--tokens", "64",
                 "--seq-len", "32", "--json", str(js)]) == 0
    shifted = json.loads(js.read_text())["average_sparsity"]
    assert main(["sparsity", str(tiny), "--act", "relu", "--data", str(text_file),
                 "--tokens", "64", "--seq-len", "32", "--json", str(js)]) == 0
    assert shifted > json.loads(js.read_text())["average_sparsity"]  # the shift zeroes more
