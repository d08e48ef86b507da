"""Calibration data, and the layer-by-layer pass the one-shot baselines share.

The baselines (Wanda, SparseGPT) prune one decoder block at a time: the block's inputs are the
outputs of the blocks below it, already pruned, so each block corrects for the error below
(SparseGPT Sec. 3; Wanda's reference code does the same).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.data import load_texts, pack_blocks


def calibration_blocks(tokenizer, data: str, samples: int, seq_len: int, seed: int = 0
                       ) -> torch.Tensor:
    """``samples`` packed blocks of ``seq_len`` tokens from the train split of ``data``:
    (samples, seq_len). Too little text is a :class:`UsageError` naming what fits."""
    if samples < 1:
        raise UsageError(f"--samples ({samples}) must be at least 1")
    if seq_len < 2:
        raise UsageError(f"--seq-len ({seq_len}) must be at least 2")
    texts = load_texts(data, "train")
    try:
        blocks = pack_blocks(tokenizer, texts, seq_len, samples * seq_len, seed=seed)
    except ValueError as e:
        raise UsageError(f"--data {data}: {e}") from None
    if len(blocks) < samples:
        raise UsageError(f"--samples {samples} is more than --data {data} holds: "
                         f"{len(blocks)} blocks of --seq-len {seq_len}; lower --samples or "
                         "--seq-len")
    return blocks


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, blocks: torch.Tensor,
                       batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states (and keyword arguments: position embeddings, masks) that ``layers[0]``
    receives for each batch of ``blocks``, stopping the forward pass there."""
    device = next(model.parameters()).device
    hidden, kwargs = [], []

    def grab(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, len(blocks), batch_size):
            try:
                model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_by_layer(model: nn.Module, layers: nn.ModuleList, blocks: torch.Tensor,
                   linears: dict[str, nn.Linear], observe: Callable[[str, torch.Tensor], None],
                   prune_layer: Callable[[list[str]], None], batch_size: int = 8,
                   desc: str | None = None) -> None:
    """For each block in ``layers``, bottom first: run the calibration inputs through it with
    ``observe(name, x)`` called on every input ``x`` (tokens, in_features) of its linears
    among ``linears``, call ``prune_layer(names)``, then run it again, pruned, to make the
    next block's inputs."""
    was_training = model.training
    model.eval()
    try:
        hidden, kwargs = first_layer_inputs(model, layers, blocks, batch_size)
        names_of = {id(m): n for n, m in linears.items()}
        for layer in tqdm(layers, desc=desc, disable=desc is None, leave=False):
            mine = [(names_of[id(m)], m) for m in layer.modules() if id(m) in names_of]
            handles = [m.register_forward_pre_hook(_observer(name, observe))
                       for name, m in mine]
            try:
                for h, kw in zip(hidden, kwargs):
                    layer(h, **kw)
            finally:
                for handle in handles:
                    handle.remove()
            prune_layer([name for name, _ in mine])
            hidden = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    finally:
        model.train(was_training)


def _observer(name: str, observe: Callable[[str, torch.Tensor], None]):
    def hook(module, args):
        x = args[0]
        observe(name, x.reshape(-1, x.shape[-1]))

    return hook

