"""Tokenise documents and pack them into fixed-length blocks (no padding, EOS between docs)."""

from __future__ import annotations

import random

import torch

from prosparse.core.errors import UsageError


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
