"""Tokenise documents and pack them into fixed-length blocks (no padding, EOS between docs)."""

from __future__ import annotations

import random

import torch

from prosparse.core.errors import UsageError

LONG_DOC_CHARS = 1 << 16
"""A document longer than this is tokenised a slice at a time, only as far as the blocks need:
a 5.8 MB one-line file measured on 256 tokens must not tokenise (and hold) all of it."""


def _head_tokens(tokenizer, text: str, need: int) -> list[int]:
    """The first ``need`` (or more) tokens of ``text``, tokenising slices cut at whitespace."""
    out: list[int] = []
    start = 0
    while start < len(text) and len(out) < need:
        end = min(len(text), start + max(LONG_DOC_CHARS, 8 * (need - len(out))))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut if cut > start else end  # before the space: the next word keeps it
        out.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return out


def pack_blocks(
    tokenizer,
    texts: list[str],
    seq_len: int,
    max_tokens: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Concatenate ``texts`` (shuffled with ``seed``), EOS after each, into ``(n, seq_len)``.

    Stops once ``max_tokens`` (rounded down to whole blocks, at least one block) are packed.
    Raises when the texts hold less than one block.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len ({seq_len}) must be at least 2")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    want = None if max_tokens is None else max(seq_len, (max_tokens // seq_len) * seq_len)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in order:
        if want is not None and len(texts[i]) > LONG_DOC_CHARS:
            ids.extend(_head_tokens(tokenizer, texts[i], want - len(ids)))
        else:
            ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if want is not None and len(ids) >= want:
            break
    n_blocks = len(ids) // seq_len
    if want is not None:
        n_blocks = min(n_blocks, want // seq_len)
    if n_blocks == 0:
        raise UsageError(
            f"the data holds {len(ids)} tokens, less than one block of --seq-len {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
