"""SFT chat data: the loss mask covers exactly the assistant turns."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse.data.chat import load_conversations, pack_chat_blocks, render_chat

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CONV = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]


@pytest.fixture
def chat_tok(tokenizer):
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_mask_marks_assistant_content_only(chat_tok):
    ids, mask = render_chat(chat_tok, CONV)
    pieces = chat_tok.convert_ids_to_tokens(ids)  # one character per token
    text = "".join(pieces)
    kept = "".join(p for p, m in zip(pieces, mask) if m)
    assert text == "<user>hi there\n<assistant>hello\n<user>bye\n<assistant>ciao\n"
    assert kept == "hello\nciao\n"


def test_pack_and_load(chat_tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CONV}) for _ in range(60)))
    convs = load_conversations(str(path), "all")
    assert len(convs) == 60 and convs[0] == CONV
    ids, mask = pack_chat_blocks(chat_tok, convs, seq_len=16, max_tokens=64)
    assert ids.shape == mask.shape == (4, 16) and mask.dtype == torch.bool
    assert 0 < mask.float().mean() < 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="no 'messages' list"):
        load_conversations(str(bad), "all")


def test_masked_lm_loss_ignores_other_tokens():
    from prosparse.training.loop import lm_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    other = ids.clone()
    other[0, :3] = torch.tensor([7, 8, 9])  # change the prompt tokens: no effect on the loss
    assert torch.equal(lm_loss(logits, ids, mask), lm_loss(logits, other, mask))
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(lm_loss(logits, ids, mask), nll[2:4].mean())
    assert lm_loss(logits, ids, torch.zeros_like(mask)) == 0
