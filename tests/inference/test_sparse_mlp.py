"""SparseMLP against the dense FFN, sparsify_ on tiny models, and greedy decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prosparse
from prosparse.inference import SparseMLP, sparsify_
from prosparse.inference.decode import calibrate_fatrelu_, greedy_decode
from prosparse.kernels import cpu, dispatch
from prosparse.measure.heldout import evaluate_blocks

BACKENDS = ["cpu"] + (["triton"] if dispatch.HAS_TRITON and (
    dispatch.HAS_CUDA or dispatch.triton_interpreting()) else [])


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=171, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def count_sparse_calls(monkeypatch) -> list[str]:
    seen = []
    original = cpu.down_step

    def spy(*a, **k):
        seen.append("down")
        return original(*a, **k)

    monkeypatch.setattr(cpu, "down_step", spy)
    return seen


@torch.inference_mode()
def test_from_dense_matches_dense_and_does_not_double_memory():
    model = tiny_llama()
    prosparse.relufy_(model, "fatrelu", 0.05)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 64)
    dense_one, dense_many = mlp(x[:, :1]), mlp(x)
    keys = {k: v.clone() for k, v in mlp.state_dict().items()}
    old_ptr = mlp.down_proj.weight.data_ptr()
    sparse = SparseMLP.from_dense(mlp, dense_below=0.0)
    assert sparse.w2t.shape == (171, 64) and sparse.w2t.is_contiguous()
    assert sparse.down_proj.weight.data_ptr() != old_ptr, "W2^T must replace the original"
    state = sparse.state_dict()
    assert state.keys() == keys.keys(), "state dict keys must not change"
    for k, v in keys.items():
        assert torch.equal(state[k], v), f"{k} changed value"
    n_params = sum(p.numel() for p in sparse.parameters())
    assert n_params == 64 * 171 * 3
    diff = (sparse(x[:, :1]) - dense_one).abs()
    assert diff.max() < 1e-5, f"decode token: max diff {diff.max():.3g}, mean {diff.mean():.3g}"
    torch.testing.assert_close(sparse(x), dense_many)  # prefill stays dense


def test_from_dense_rejects_silu_with_a_fix():
    model = tiny_llama()
    with pytest.raises(ValueError, match="relufy_"):
        SparseMLP.from_dense(model.model.layers[0].mlp)


@torch.inference_mode()
def test_fused_gate_up_phi3():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(0)
    mlp = Phi3MLP(Phi3Config(hidden_size=64, intermediate_size=171, hidden_act="relu")).eval()
    x = torch.randn(1, 1, 64)
    dense = mlp(x)
    sparse = SparseMLP.from_dense(mlp, dense_below=0.0)
    assert sparse.fused
    diff = (sparse(x) - dense).abs()
    assert diff.max() < 1e-5, f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_decode_identical_tokens(backend, monkeypatch):
    dev = "cuda" if backend == "triton" and dispatch.HAS_CUDA else "cpu"
    model = tiny_llama().to(dev)
    prompt = torch.tensor([[1, 5, 9, 17, 33]], device=dev)
    thresholds = calibrate_fatrelu_(model, prompt, sparsity=0.9)
    assert all(t > 0 for t in thresholds)
    sparsity = evaluate_blocks(model, prompt).average_sparsity
    assert 0.8 < sparsity < 0.95, f"calibrated sparsity {sparsity:.3f}, wanted about 0.9"
    dense = greedy_decode(model, prompt, new_tokens=12)
    swapped = sparsify_(model, backend=backend, dense_below=0.0)
    assert swapped == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(layer.mlp, SparseMLP) for layer in model.model.layers)
    seen = count_sparse_calls(monkeypatch)
    sparse = greedy_decode(model, prompt, new_tokens=12)
    assert backend != "cpu" or len(seen) >= 2 * 11, "decode steps did not take the sparse path"
    assert sparse.tokens == dense.tokens, f"dense {dense.tokens} != sparse {sparse.tokens}"
    assert sparsify_(model) == [], "already-sparse FFNs are left alone"


def test_lazy_exports():
    assert prosparse.SparseMLP is SparseMLP and prosparse.sparsify_ is sparsify_


@torch.inference_mode()
def test_bench_decode_alternates_rounds_and_leaves_the_model_dense():
    from prosparse.inference.benchmark import bench_decode

    model = tiny_llama()
    prosparse.relufy_(model, "fatrelu", 0.05)
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    r = bench_decode(model, prompt, new_tokens=6, repeats=2)
    assert r["repeats"] == 2 and len(r["dense_tokens_per_s_runs"]) == 2
    assert len(r["sparse_tokens_per_s_runs"]) == 2
    assert r["speedup"] == pytest.approx(r["sparse_tokens_per_s"] / r["dense_tokens_per_s"])
    assert r["identical"] and r["ffns_swapped"] == 2  # fp32: the sparse path keeps the tokens
    assert not any(isinstance(m, SparseMLP) for m in model.modules()), "left dense"
    with pytest.raises(ValueError, match="repeats"):
        bench_decode(model, prompt, new_tokens=2, repeats=0)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.inference_mode()
def test_threshold_moved_after_the_swap_is_the_one_that_runs(backend):
    """The activation module is the threshold's one home: relufy_ after sparsify_ (as
    threshold-aware training and the sweep do) changes what the sparse FFN computes, and the
    dense module put back by restore() carries the new threshold too."""
    from prosparse.inference.sparse_mlp import sparsify_with_restore_
    from prosparse.models.activations import fatrelu

    dev = "cuda" if backend == "triton" and dispatch.HAS_CUDA else "cpu"
    model = tiny_llama().to(dev)
    prosparse.relufy_(model, "fatrelu", 0.01)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3)).to(dev)
    _, restore = sparsify_with_restore_(model, backend=backend, dense_below=0.0)
    mlp = model.model.layers[0].mlp
    before = mlp(x)
    prosparse.relufy_(model, "fatrelu", 0.3)
    assert mlp.activation == ("fatrelu", 0.3)
    after = mlp(x)
    ref = mlp.down_proj(fatrelu(mlp.gate_proj(x), 0.3) * mlp.up_proj(x))
    assert not torch.allclose(before, after), "the new threshold changed nothing"
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-6)
    restore()
    dense = model.model.layers[0].mlp
    assert not isinstance(dense, SparseMLP)
    torch.testing.assert_close(dense(x), ref, rtol=1e-5, atol=1e-6)
