"""Nothing lost: a result file prosparse did not write is not replaced without --overwrite, an
output is never one of the command's own inputs, and an interrupted command leaves no partial
output behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from prosparse import save_model
from prosparse.cli import main
from tests.conftest import char_tokenizer, tiny_llama


@pytest.fixture
def model_dir(tmp_path):
    from prosparse import relufy_

    model = tiny_llama()
    relufy_(model, "relu")
    return save_model(model, char_tokenizer(), tmp_path / "m")


def _err(capsys) -> str:
    """The one error line on stderr (progress bars aside), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_json_onto_a_file_prosparse_did_not_write_is_refused(model_dir, text_file, capsys):
    config = model_dir / "config.json"
    before = config.read_text()
    argv = ["sparsity", str(model_dir), "--data", f"c={text_file}", "--tokens", "128",
            "--seq-len", "32", "--json"]
    assert main([*argv, str(config)]) == 2
    assert "already exists and was not written by prosparse" in _err(capsys)
    assert config.read_text() == before
    corpus = text_file.read_text()
    assert main([*argv, str(text_file)]) == 2  # the input corpus: an input, refused always
    assert "also an input of this command" in _err(capsys)
    assert text_file.read_text() == corpus


def test_a_result_prosparse_wrote_is_replaced_and_overwrite_replaces_any(model_dir, text_file,
                                                                          tmp_path):
    argv = ["sparsity", str(model_dir), "--data", f"c={text_file}", "--tokens", "128",
            "--seq-len", "32", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0 and main(argv) == 0  # a re-run replaces its own result
    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    assert main([*argv[:-1], str(foreign), "--overwrite"]) == 0
    assert "average_sparsity" in json.loads(foreign.read_text())


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(model_dir, text_file,
                                                                   tmp_path, capsys):
    pairs = tmp_path / "pairs"
    assert main(["predictors", "collect", str(model_dir), "--data", f"c={text_file}",
                 "--tokens", "128", "--seq-len", "32", "--out", str(pairs)]) == 0
    capsys.readouterr()
    assert main(["predictors", "train", str(pairs), "--out", str(pairs), "--overwrite"]) == 2
    assert "also an input of this command" in _err(capsys)
    assert (pairs / ".prosparse.json").is_file()
    assert main(["convert", str(model_dir), "--act", "relu", "--out", str(tmp_path),
                 "--overwrite"]) == 2  # an --out folder holding the model
    assert "also an input" in _err(capsys)


def test_plot_with_a_suffix_matplotlib_cannot_write_is_refused_before_work(model_dir, text_file,
                                                                           tmp_path, capsys):
    assert main(["sparsity", str(model_dir), "--data", f"c={text_file}", "--plot",
                 str(tmp_path / "layers.txt")]) == 2
    assert "matplotlib cannot write a .txt file" in _err(capsys)


def test_sigterm_inside_a_write_leaves_no_temporary_folder(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from prosparse.cli.main import _terminate
        from prosparse.core.io import atomic_dir
        signal.signal(signal.SIGTERM, _terminate)
        with atomic_dir({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "half").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
            sys.exit("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 128 + 15, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .out.tmp-*, no lock


def test_library_validation_errors_are_one_line_at_the_cli(tmp_path, capsys):
    silu = save_model(tiny_llama(), char_tokenizer(), tmp_path / "silu")
    assert main(["bench", "decode", str(silu), "--new-tokens", "4", "--repeats", "1"]) == 2
    line = _err(capsys)
    assert "ReLU" in line and "Traceback" not in line
