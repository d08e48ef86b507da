"""Activation annealing: the pure ramp at its first, middle and last step, the blend's value,
and the model left exactly ReLU-family at the end of the ramp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prosparse import find_gated_ffns, relufy_
from prosparse.models.anneal import AnnealedActivation, anneal_factor, begin_anneal_, set_anneal_
from tests.conftest import tiny_llama


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_ramp_first_middle_last(shape):
    first = 1 / 60 if shape == "linear" else (1 - math.cos(math.pi / 60)) / 2
    assert anneal_factor(1, 60, shape) == pytest.approx(first)
    assert anneal_factor(30, 60, shape) == pytest.approx(0.5)
    assert anneal_factor(60, 60, shape) == 1.0 and anneal_factor(61, 60, shape) == 1.0
    values = [anneal_factor(s, 60, shape) for s in range(1, 61)]
    assert values == sorted(values)  # never decreases
    assert anneal_factor(5, 0, shape) == 1.0  # no ramp
    with pytest.raises(ValueError, match="linear, cosine"):
        anneal_factor(1, 10, "sine")


def test_blend_and_the_exact_model_at_the_end():
    model = tiny_llama()
    originals = [f.act for f in find_gated_ffns(model)]
    relufy_(model)
    begin_anneal_(model, originals)
    g = torch.randn(4, 176)
    act = find_gated_ffns(model)[0].act
    assert isinstance(act, AnnealedActivation)
    torch.testing.assert_close(act(g), F.silu(g))  # alpha 0: the original
    assert set_anneal_(model, 0.25)
    torch.testing.assert_close(act(g), 0.75 * F.silu(g) + 0.25 * torch.relu(g))
    ids = torch.randint(0, 128, (1, 9))
    assert not set_anneal_(model, 1.0)
    assert all(isinstance(f.act, torch.nn.ReLU) for f in find_gated_ffns(model))
    relu_model = tiny_llama()
    relufy_(relu_model)
    torch.testing.assert_close(model(ids).logits, relu_model(ids).logits)  # exactly ReLU
