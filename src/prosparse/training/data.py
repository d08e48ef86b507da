"""Training blocks: a weighted mixture of data sources, tokenised, packed and cached on disk.

The order is a pure function of the seed, and the blocks a step reads are a pure function of the
step, so resuming needs only the step (the "data position" saved in checkpoints is derived from
it and recorded for people).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from prosparse.data import load_texts, pack_blocks, parse_data_spec
from prosparse.data.chat import load_conversations, pack_chat_blocks


def mixture_counts(n_blocks: int, weights: list[float]) -> list[int]:
    """Split ``n_blocks`` by ``weights`` (largest remainders), every positive weight >= 1 block."""
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.weights ({weights}) must be >= 0 with a positive sum")
    total = sum(weights)
    raw = [n_blocks * w / total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n_blocks - sum(counts)]:
        counts[i] += 1
    return [max(c, 1) if w > 0 else 0 for c, w in zip(counts, weights)]


def build_blocks(tokenizer, sources: list[str], weights: list[float] | None, seq_len: int,
                 n_blocks: int, seed: int = 0, cache_dir: str | Path | None = None,
                 chat: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids, mask)``: ``(n, seq_len)`` training blocks (n <= ``n_blocks`` when the data is
    smaller), mixed by ``weights`` and interleaved in a seeded order; cached under ``cache_dir``
    when given. ``mask`` is None for text; for ``chat`` data (SFT) it marks the assistant tokens
    that carry the LM loss."""
    key = json.dumps({"tok": getattr(tokenizer, "name_or_path", ""), "vocab": len(tokenizer),
                      "sources": sources, "weights": weights, "seq_len": seq_len,
                      "n": n_blocks, "seed": seed, **({"chat": True} if chat else {})},
                     sort_keys=True)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"blocks-{digest}.pt"
        if path.is_file():
            cached = torch.load(path)
            return (cached["ids"], cached["mask"]) if chat else (cached, None)
    specs = [parse_data_spec(s) for s in sources]
    if weights is None:
        weights = [1.0] * len(specs)
    counts = mixture_counts(n_blocks, weights)
    parts = []
    for spec, count in zip(specs, counts):
        if not count:
            continue
        if chat:
            parts.append(pack_chat_blocks(tokenizer, load_conversations(spec, "train"), seq_len,
                                          count * seq_len, seed=seed))
        else:
            ids = pack_blocks(tokenizer, load_texts(spec, "train"), seq_len, count * seq_len,
                              seed=seed)
            parts.append((ids, None))
    order = [(i, j) for i, p in enumerate(parts) for j in range(len(p[0]))]
    random.Random(seed).shuffle(order)
    blocks = torch.stack([parts[i][0][j] for i, j in order])
    mask = torch.stack([parts[i][1][j] for i, j in order]) if chat else None
    if path is not None:
        from prosparse.core.io import atomic_write

        obj = {"ids": blocks, "mask": mask} if chat else blocks
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return blocks, mask


def heldout_blocks(tokenizer, sources: list[str], seq_len: int, tokens: int
                   ) -> dict[str, torch.Tensor]:
    """Held-out blocks per source name (the deterministic 5% split of prosparse.data)."""
    out = {}
    for s in sources:
        spec = parse_data_spec(s)
        out[spec.name] = pack_blocks(tokenizer, load_texts(spec, "heldout"), seq_len, tokens)
    return out


def micro_batch(blocks: torch.Tensor, index: int, batch_size: int, rank: int = 0,
                world: int = 1) -> torch.Tensor:
    """Rows of global micro-batch ``index`` (0-based) for ``rank``; wraps around the data."""
    n = len(blocks)
    start = (index * world + rank) * batch_size
    rows = [(start + k) % n for k in range(batch_size)]
    return blocks[rows]
