"""Packing documents into blocks: only as much of a long document is tokenised as the blocks
need, with the same tokens as tokenising it whole."""

from __future__ import annotations

import torch

from prosparse.data.packing import LONG_DOC_CHARS, pack_blocks


class Spy:
    """A tokenizer wrapper that records the length of every text it is given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)


def test_a_huge_one_line_document_is_tokenised_only_as_far_as_needed(tokenizer):
    spy = Spy(tokenizer)
    text = "alpha beta gamma " * 350_000  # about 6 MB, one line
    blocks = pack_blocks(spy, [text], 64, 256)
    assert blocks.shape == (4, 64)
    assert max(spy.lengths) <= 2 * LONG_DOC_CHARS and sum(spy.lengths) < len(text) // 20
    whole = tokenizer(text[:100_000], add_special_tokens=False)["input_ids"][:256]
    assert torch.equal(blocks.flatten(), torch.tensor(whole))


def test_short_documents_pack_as_before(tokenizer):
    docs = [f"doc {i} " + "word " * 30 for i in range(20)]
    blocks = pack_blocks(tokenizer, docs, 16, 160, seed=0)
    assert blocks.shape == (10, 16)
    assert (blocks == tokenizer.eos_token_id).sum() >= 1
