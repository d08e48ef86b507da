"""Shared fixtures: tiny random models built from configs (2 layers, d_model 64), never a hub."""

from __future__ import annotations

import importlib.util
import os
import string
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at the first import of
# prosparse.kernels.triton, which any test folder may trigger: set it before all of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@contextmanager
def benchmark_script(name: str):
    """``benchmarks/NAME.py`` imported as module ``NAME`` (registered in ``sys.modules`` while
    in use: dataclasses look their module up there)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


def tiny_llama(intermediate_size: int = 176, vocab_size: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def char_tokenizer():
    """A character-level fast tokenizer (no files, no hub): ids < 128, EOS = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation + " \n"
    vocab = {"<unk>": 0, "</s>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    """A small .txt corpus: documents separated by blank lines."""
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "relu", "token", "layer", "model"]
    docs = []
    for _ in range(40):
        idx = torch.randint(len(words), (30,), generator=rng).tolist()
        docs.append(" ".join(words[i] for i in idx) + ".")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path
