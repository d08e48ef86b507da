"""Fixtures of the training tests: a tiny random Llama with its tokenizer, saved as a folder."""

import pytest


@pytest.fixture
def tiny_dir(tmp_path):
    from tests.conftest import char_tokenizer, tiny_llama

    path = tmp_path / "tiny"
    model, tok = tiny_llama(), char_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
