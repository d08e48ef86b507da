"""Data specs, deterministic splits, users' files, packing."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse.data import load_texts, pack_blocks, parse_data_spec
from prosparse.data.sources import is_heldout


def test_parse_data_spec():
    assert parse_data_spec("wiki").source == "wiki"
    s = parse_data_spec("notes=/tmp/a.txt")
    assert (s.name, s.source) == ("notes", "/tmp/a.txt")
    assert parse_data_spec("/tmp/b.jsonl").name == "b"
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_data_spec("=x")


def test_split_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(400)))
    train, held = load_texts(f"d={path}", "train"), load_texts(f"d={path}", "heldout")
    assert len(train) + len(held) == 400 and not set(train) & set(held)
    assert 5 <= len(held) <= 40
    assert held == load_texts(str(path), "heldout")
    assert is_heldout("x") == is_heldout("x")


def test_jsonl_messages_and_errors(tmp_path):
    ok = tmp_path / "chat.jsonl"
    ok.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}]}) + "\n")
    assert load_texts(str(ok), "all") == ["user: hi\nassistant: hello"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has neither a 'text' string"):
        load_texts(str(bad), "all")
    with pytest.raises(FileNotFoundError, match="no data at 'nope.txt'"):
        load_texts("nope.txt")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a")
        load_texts(str(tmp_path / "x.csv"))


def test_pack_blocks(tokenizer):
    texts = ["abc", "defg", "hi"]
    blocks = pack_blocks(tokenizer, texts, seq_len=4, seed=0)
    assert blocks.shape == (3, 4)  # 3+1 + 4+1 + 2+1 = 12 tokens
    assert (blocks == tokenizer.eos_token_id).sum() == 3
    assert torch.equal(blocks, pack_blocks(tokenizer, texts, seq_len=4, seed=0))
    assert pack_blocks(tokenizer, texts, seq_len=4, max_tokens=5).shape == (1, 4)
    with pytest.raises(ValueError, match="less than one block of --seq-len 64"):
        pack_blocks(tokenizer, texts, seq_len=64)


def test_embedded_corpora_are_there():
    wiki = load_texts("wiki", "heldout")
    assert 400 < len(wiki) < 600 and all(isinstance(t, str) and t for t in wiki[:10])
    qa = load_texts("qa", "heldout")
    assert qa[0].startswith("Question: ") and "\nAnswer: " in qa[0]
