"""Backend choice, forced-backend errors and the dense fallback."""

from __future__ import annotations

import pytest
import torch

from prosparse.kernels import cpu, dispatch, reference


def test_auto_picks_cpu_for_cpu_tensors():
    assert dispatch.resolve_backend("cpu") == "cpu"
    assert dispatch.resolve_backend("cpu", "auto") == "cpu"


def test_unknown_backend_lists_choices():
    with pytest.raises(KeyError, match="choose one of auto, reference, cpu, triton"):
        dispatch.resolve_backend("cpu", "cuda")


def test_forced_triton_without_triton_is_an_error(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        dispatch.resolve_backend("cpu", "triton")


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dispatch.resolve_backend("cpu", "triton")


def test_forced_cpu_backend_on_cuda_is_an_error():
    with pytest.raises(ValueError, match="needs CPU tensors"):
        dispatch.resolve_backend(torch.device("cuda"), "cpu")


def _calls(monkeypatch):
    seen = []

    def spy(name, fn):
        def wrapped(*a, **k):
            seen.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(cpu, "up_step", spy("up", cpu.up_step))
    monkeypatch.setattr(cpu, "down_step", spy("down", cpu.down_step))
    return seen


def test_dense_fallback_below_crossover_and_above_batch(monkeypatch):
    seen = _calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x, w1, w2t = torch.randn(1, 32, generator=gen), torch.randn(50, 32), torch.randn(50, 32)
    dense_g = torch.rand(1, 50, generator=gen) + 0.1  # every neuron active: sparsity 0
    y = dispatch.sparse_ffn(x, dense_g, w1, w2t, dense_below=0.3)
    assert seen == [], "sparsity 0 must take the dense path"
    torch.testing.assert_close(y, reference.down_step(reference.up_step(x, dense_g, w1), w2t))

    sparse_g = -torch.rand(1, 50, generator=gen)
    sparse_g[0, :5] = 1.0  # sparsity 0.9
    dispatch.sparse_ffn(x, sparse_g, w1, w2t, dense_below=0.3)
    assert seen == ["up", "down"], "sparsity 0.9 must take the sparse path"

    seen.clear()
    dispatch.sparse_ffn(x.repeat(5, 1), sparse_g.repeat(5, 1), w1, w2t, max_tokens=4)
    assert seen == [], "more tokens than max_tokens must take the dense path"


def test_use_dense_thresholds():
    assert dispatch.use_dense(n_active=80, d_ff=100, tokens=1, dense_below=0.3, max_tokens=4)
    assert not dispatch.use_dense(n_active=60, d_ff=100, tokens=1, dense_below=0.3, max_tokens=4)
    assert dispatch.use_dense(n_active=1, d_ff=100, tokens=5, dense_below=0.3, max_tokens=4)


def test_scratch_buffer_works_inside_and_outside_inference_mode():
    from prosparse.kernels import cpu

    cpu._scratch.clear()
    gen = torch.Generator().manual_seed(0)
    x, w1 = torch.randn(1, 24, generator=gen), torch.randn(40, 24, generator=gen)
    g = torch.randn(1, 40, generator=gen)
    idx = (g[0] > 0).nonzero().flatten()
    with torch.inference_mode():
        inside = cpu.up_step(x, g, w1, idx)
    outside = cpu.up_step(x, g, w1, idx)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    torch.testing.assert_close(outside, reference.up_step(x, g, w1))
