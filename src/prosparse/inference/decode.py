"""Greedy decoding through ``model.generate`` unchanged, timed per token, and the 7B-shaped model.

Tokens/s counts decode steps only: a logits processor stamps the clock at every step, so the
prefill (dense in both runs) is left out and the rate is ``(n - 1) / (t_last - t_first)``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class DecodeRun:
    """One timed greedy decode."""

    tokens: list[int]
    """The generated token ids (prompt excluded)."""
    tokens_per_s: float
    """Decode steps per second from the median step time (prefill excluded): one slow step,
    a page fault or a scheduler hiccup, does not move it."""


class _Clock:
    """A logits processor that records when each decode step's logits are ready."""

    def __init__(self, bar: tqdm | None = None):
        self.stamps: list[float] = []
        self.bar = bar

    def __call__(self, input_ids, scores):
        if scores.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
        return scores


@torch.inference_mode()
def greedy_decode(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 64, desc: str | None = None
) -> DecodeRun:
    """Generate exactly ``new_tokens`` greedy tokens with ``model.generate`` and time them."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError(f"new_tokens ({new_tokens}) must be at least 2 to time decode steps")
    with tqdm(total=new_tokens, desc=desc, leave=False, disable=desc is None) as bar:
        clock = _Clock(bar)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return DecodeRun(out[0, input_ids.shape[1]:].tolist(), 1.0 / statistics.median(steps))


def llama2_7b_shaped(
    layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A random LLaMA2-7B-shaped ``LlamaForCausalLM`` (d_model 4096, d_ff 11008, 32 heads).

    ``layers`` of the real 32 keep memory small; the vocabulary is scaled by ``layers / 32``
    (32000 for 32 layers) so the LM head keeps its share of each decode step's weight traffic
    and the end-to-end bound stays the 7B one (about 1.64x at 89.3%: ``docs/kernels.md``).
    The weights are drawn on ``device`` directly, in ``dtype``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=max(256, round(32000 * layers / 32)),
        max_position_embeddings=4096,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval()


@torch.inference_mode()
def calibrate_fatrelu_(model: nn.Module, input_ids: torch.Tensor, sparsity: float) -> list[float]:
    """ReLUfy ``model`` with FATReLU and set each layer's threshold to the ``sparsity`` quantile
    of its gate pre-activations on ``input_ids``, so about that fraction of neurons is inactive.
    Returns the thresholds, one per layer."""
    from prosparse.models.activations import FATReLU
    from prosparse.models.relufy import find_gated_ffns, relufy_

    ffns = find_gated_ffns(model)
    gates: dict[str, torch.Tensor] = {}
    hooks = [
        (f.module.gate_proj if not f.fused else f.module.gate_up_proj).register_forward_hook(
            lambda m, i, o, name=f.name: gates.__setitem__(name, o.float().flatten()))
        for f in ffns
    ]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    relufy_(model, "fatrelu", 1.0)  # config and module type; values set below
    thresholds = []
    for f in ffns:
        g = gates[f.name]
        t = max(float(torch.quantile(g[: 2**24], sparsity)), 0.0)
        setattr(f.module, f.act_attr, FATReLU(t).to(g.device))
        thresholds.append(t)
    return thresholds
