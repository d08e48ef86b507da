"""The sync-free Triton decode step: fixed-grid kernels that skip inactive rows in-kernel,
against the plain-torch reference (under TRITON_INTERPRET=1 on CPU), with no host sync and a
grid that does not depend on the data; on a GPU, captured in a CUDA graph and compiled with
``torch.compile(mode="reduce-overhead")``."""

from __future__ import annotations

import pytest
import torch

from prosparse.kernels import dispatch, reference
from tests.kernels.test_operators import assert_close  # shared tolerances per dtype

pytestmark = pytest.mark.skipif(
    not (dispatch.HAS_TRITON and (dispatch.HAS_CUDA or dispatch.triton_interpreting())),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if dispatch.HAS_CUDA else "cpu"


def needs_cuda(test):
    """A GPU test: marked ``gpu`` (``pytest -m gpu`` selects it) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not dispatch.HAS_CUDA,
                                              reason="needs a CUDA device")(test))


def tk():
    from prosparse.kernels import triton as triton_impl

    return triton_impl


def inputs(tokens, d_model, d_ff, sparsity, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    active = round((1 - sparsity) * d_ff)
    g = -torch.rand(tokens, d_ff, generator=gen) - 0.01
    for t in range(tokens):
        pick = torch.randperm(d_ff, generator=gen)[:active]
        g[t, pick] = torch.rand(active, generator=gen) + 0.3
    x = torch.randn(tokens, d_model, generator=gen)
    w1 = torch.randn(d_ff, d_model, generator=gen) / d_model**0.5
    w2t = torch.randn(d_ff, d_model, generator=gen) / d_ff**0.5
    return [v.to(dtype).to(DEV) for v in (x, g, w1, w2t)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("tokens", [1, 3])
def test_fixed_grid_steps_match_reference(dtype, sparsity, tokens):
    x, g, w1, w2t = inputs(tokens, 67, 173, sparsity, dtype)
    ref1 = reference.up_step(x, g, w1, "fatrelu", 0.25)
    x1 = tk().up_step_fixed(x, g, w1, "fatrelu", 0.25)
    case = f"{dtype} s={sparsity} tokens={tokens}"
    assert torch.equal(x1 != 0, ref1 != 0), f"step 2 active set differs [{case}]"
    assert_close(x1, ref1, dtype, f"step 2 [{case}]")
    ref3 = reference.down_step(ref1.float(), w2t.float())
    # rows=128 over d_ff=173: two row splits, the second ragged
    y = tk().down_step_fixed(ref1, w2t, rows=128, block_a=64, block_d=32)
    assert y.dtype == dtype and y.shape == (tokens, 67)
    assert_close(y, ref3, dtype, f"step 3 [{case}]")
    # three row splits summed by the fused Triton reduction instead of torch
    y2 = tk().down_step_fixed(ref1, w2t, rows=64, block_a=32, block_d=32, fused_sum=True)
    assert y2.dtype == dtype and y2.shape == (tokens, 67)
    assert_close(y2, ref3, dtype, f"step 3, fused sum [{case}]")


def test_grid_is_fixed_by_shapes_not_by_the_active_count(monkeypatch):
    grids = []
    for name in ("_up_fixed_kernel", "_down_fixed_kernel"):
        kernel = getattr(tk(), name)

        class Recorder:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                grids.append((self.n, grid))
                return self.k[grid]

        monkeypatch.setattr(tk(), name, Recorder(kernel, name))
    for s in (0.0, 0.5, 0.99):
        x, g, w1, w2t = inputs(1, 67, 173, s, torch.float32)
        dispatch.sparse_ffn(x, g, w1, w2t, "relu", backend="triton")
    assert len(grids) == 6 and len(set(grids)) == 2, grids


def test_dispatch_triton_path_never_asks_the_host(monkeypatch):
    """No nonzero, item or tolist anywhere in a decode step on the triton backend: each would
    be a device-to-host copy per layer (what rules out CUDA graphs)."""
    x, g, w1, w2t = inputs(1, 67, 173, 0.8, torch.float32)
    mask = (torch.rand(1, 173) < 0.2).to(DEV)
    ref_y = reference.down_step(reference.up_step(x, g, w1), w2t)
    ref_p = reference.predicted_ffn(x, mask, w1, w1, w2t)

    def host_sync(*a, **k):
        raise AssertionError("host sync in the triton decode path")

    for name in ("nonzero", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    monkeypatch.setattr(torch, "nonzero", host_sync)
    y = dispatch.sparse_ffn(x, g, w1, w2t, "relu", backend="triton", dense_below=0.9)
    y3 = dispatch.down_step(reference.up_step(x, g, w1), w2t, backend="triton")
    p = dispatch.predicted_ffn(x, mask, w1, w1, w2t, backend="triton")
    monkeypatch.undo()
    assert_close(y, ref_y, torch.float32, "sparse_ffn")
    assert_close(y3, ref_y, torch.float32, "down_step")
    assert_close(p, ref_p, torch.float32, "predicted_ffn")


@needs_cuda
def test_no_device_to_host_sync_on_cuda():
    x, g, w1, w2t = inputs(1, 4096, 11008, 0.8932, torch.bfloat16)
    dispatch.sparse_ffn(x, g, w1, w2t, "relu", backend="triton")  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dispatch.sparse_ffn(x, g, w1, w2t, "relu", backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_decode_step_runs_captured_in_a_cuda_graph():
    x, g, w1, w2t = inputs(1, 4096, 11008, 0.8932, torch.bfloat16)
    static_x, static_g = x.clone(), g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        dispatch.sparse_ffn(static_x, static_g, w1, w2t, "relu", backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = dispatch.sparse_ffn(static_x, static_g, w1, w2t, "relu", backend="triton")
    for seed in (1, 2):  # new tokens with new active sets, replayed through the same graph
        nx, ng, _, _ = inputs(1, 4096, 11008, 0.8932, torch.bfloat16, seed=seed)
        static_x.copy_(nx)
        static_g.copy_(ng)
        graph.replay()
        ref = reference.down_step(reference.up_step(nx, ng, w1).float(), w2t.float())
        assert_close(static_y, ref, torch.bfloat16, f"graph replay {seed}")


@needs_cuda
def test_sparse_mlp_under_torch_compile_reduce_overhead():
    from transformers import LlamaConfig, LlamaForCausalLM

    import prosparse
    from prosparse.inference import sparsify_

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=691, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    prosparse.relufy_(model, "fatrelu", 0.05)
    sparsify_(model, backend="triton")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    eager = mlp(x)
    compiled = torch.compile(mlp, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        for _ in range(3):  # record, then replay the CUDA graph
            out = compiled(x)
    assert_close(out, eager, torch.bfloat16, "compiled vs eager SparseMLP")


def _predicted_mlp(dev, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    import prosparse
    from prosparse.inference.predicted import attach_predictors_
    from prosparse.predictors.model import PredictorSet

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=173, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).to(dev, dtype).eval()
    prosparse.relufy_(model, "relu")
    pset = PredictorSet(64, 173, 1, 16).eval()
    pset.thresholds.fill_(0.0)
    attach_predictors_(model, pset, backend="triton")
    return model


def test_predicted_mlp_forward_never_asks_the_host(monkeypatch):
    """The predictor-driven FFN counts its predicted neurons on the device: no item(), so a
    decode step with predictors can be captured in a CUDA graph."""
    from prosparse.inference.predicted import mean_predicted_sparsity, reset_predicted_counts

    model = _predicted_mlp(DEV)
    reset_predicted_counts(model)
    x = torch.randn(1, 1, 64, device=DEV)

    def host_sync(*a, **k):
        raise AssertionError("host sync in the predicted FFN")

    layer = model.model.layers[0]
    with torch.no_grad():
        for name in ("nonzero", "item", "tolist", "__int__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, host_sync)
        # the norm's hook hands the residual to the predicted FFN, as in a decoder layer
        y = layer.mlp(layer.post_attention_layernorm(x))
        monkeypatch.undo()
    assert y.shape == (1, 1, 64) and torch.isfinite(y).all()
    assert 0.0 <= mean_predicted_sparsity(model) <= 1.0
    assert layer.mlp.tokens == 1


@needs_cuda
def test_predicted_decode_step_counts_inside_a_cuda_graph():
    from prosparse.inference.predicted import reset_predicted_counts

    model = _predicted_mlp("cuda", torch.bfloat16)
    layer = model.model.layers[0]
    x = torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer.mlp(layer.post_attention_layernorm(x))
        reset_predicted_counts(model)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer.mlp(layer.post_attention_layernorm(x))
        for _ in range(3):
            graph.replay()
    torch.cuda.synchronize()
    assert_close(out, eager, torch.bfloat16, "graph replay of the predicted FFN")
    assert layer.mlp.tokens == 3  # capture records the step without running it


if dispatch.HAS_TRITON:
    import triton
    import triton.language as tl

    from prosparse.kernels.triton import _activate

    @triton.jit
    def _act_kernel(g_ptr, p_ptr, out_ptr, N: tl.constexpr, ACT: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, _activate(tl.load(g_ptr + offs), tl.load(p_ptr), ACT))


def test_activation_takes_a_float64_scalar():
    """torch.compile hands a Python float to a user Triton kernel as fp64: the activation must
    round it like any other threshold (it once failed to compile: a 64-bit bitcast to 32)."""
    from prosparse.kernels.activations import activate

    g = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(DEV)
    for act, code in (("fatrelu", 1), ("shifted_relu", 2)):
        param = torch.tensor([0.3], dtype=torch.float64, device=DEV)
        out = torch.empty(64, dtype=torch.float32, device=DEV)
        _act_kernel[(1,)](g, param, out, N=64, ACT=code)
        assert torch.equal(out, activate(g, act, 0.3).float()), act
