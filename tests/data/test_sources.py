"""Data specs, deterministic splits, users' files, packing."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse.core.errors import UsageError
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
    with pytest.raises(UsageError, match="no data at 'nope.txt'"):
        load_texts("nope.txt")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01abc")
    with pytest.raises(UsageError, match=r"data file .*x.bin is binary, not text"):
        load_texts(str(tmp_path / "x.bin"))


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


def test_hf_dataset_from_disk_and_offline_error(tmp_path, monkeypatch):
    import datasets

    from prosparse.data.sources import parse_hf_source

    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1@test#text") == (
        "wikitext", "wikitext-2-raw-v1", "test", "text")
    assert parse_hf_source("hf:/d") == ("/d", None, "train", "text")
    with pytest.raises(ValueError, match="names no dataset"):
        parse_hf_source("hf:@train")

    docs = [f"document {i} about sparse activations" for i in range(300)]
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    spec = f"hf:{tmp_path / 'ds'}#body"
    assert parse_data_spec(spec).name == "ds"
    assert sorted(load_texts(spec, "all")) == sorted(docs)
    held = load_texts(spec, "heldout")
    assert 0 < len(held) < 40 and not set(held) & set(load_texts(spec, "train"))
    with pytest.raises(ValueError, match="has no field 'text'; its fields are body"):
        load_texts(f"hf:{tmp_path / 'ds'}")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(UsageError, match="could not load Hugging Face dataset "
                                                "'hf:no-such/dataset-xyz'.*save_to_disk"):
        load_texts("hf:no-such/dataset-xyz", "all")
