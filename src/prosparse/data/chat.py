"""Chat data for SFT stages: conversations rendered with the model's chat template, with a loss
mask that keeps only the assistant turns (paper Appendix J trains SFT on instruction data).

The mask is found by rendering: the assistant turn ``i`` spans the characters between the
template applied to ``messages[:i]`` with a generation prompt and the template applied to
``messages[:i + 1]``; tokens whose characters fall inside such a span carry loss. This needs a
template whose renderings of a conversation's prefixes are prefixes of the whole (true of the
common templates); one that is not gets an error rather than a wrong mask.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from prosparse.core.errors import UsageError
from prosparse.data.sources import DataSpec, _select, parse_data_spec, read_text_file


def load_conversations(spec: str | DataSpec, split: str = "train") -> list[list[dict]]:
    """``messages`` lists from a ``.jsonl`` file (one ``{"messages": [...]}`` per line)."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    path = Path(spec.source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        raise UsageError(f"chat data {spec.name!r} must be a .jsonl file of "
                         f"{{\"messages\": [{{\"role\", \"content\"}}, ...]}} lines (got {path})")
    items = []
    for i, line in enumerate(read_text_file(path).splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i + 1} is not valid JSON ({e.msg}); each line of a "
                             ".jsonl file is one JSON object") from None
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
            raise UsageError(f"{path}:{i + 1} has no 'messages' list of {{role, content}} dicts")
        items.append((f"{path.name}:{i}", json.dumps(msgs)))
    return [json.loads(m) for m in _select(items, split)]


def render_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and a 0/1 mask marking assistant tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                              add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(end) and end.startswith(start)):
            raise UsageError("the chat template does not render conversation prefixes as "
                             "prefixes of the whole; answer-only loss cannot be located")
        spans.append((len(start), len(end)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a and b <= e and b > a for s, e in spans))
            for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def pack_chat_blocks(tokenizer, conversations: list[list[dict]], seq_len: int,
                     max_tokens: int | None = None, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations (shuffled with ``seed``) packed back to back into ``(n, seq_len)`` ids and
    masks, like :func:`prosparse.data.pack_blocks`; a conversation may span two blocks."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    want = None if max_tokens is None else max(seq_len, (max_tokens // seq_len) * seq_len)
    ids: list[int] = []
    mask: list[int] = []
    for i in order:
        a, b = render_chat(tokenizer, conversations[i])
        ids.extend(a)
        mask.extend(b)
        if want is not None and len(ids) >= want:
            break
    n = len(ids) // seq_len if want is None else min(len(ids) // seq_len, want // seq_len)
    if n == 0:
        raise UsageError(f"the chat data holds {len(ids)} tokens, less than one block of "
                         f"seq_len {seq_len}")
    return (torch.tensor(ids[: n * seq_len]).view(n, seq_len),
            torch.tensor(mask[: n * seq_len], dtype=torch.bool).view(n, seq_len))
