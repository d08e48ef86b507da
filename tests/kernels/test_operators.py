"""Steps (2) and (3) of every backend against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch

from prosparse.kernels import dispatch, reference
from prosparse.models.activations import FATReLU

# bf16 runs under the Triton interpreter too: the kernels upcast to fp32 right after each load,
# so they never do the bf16 arithmetic that the interpreter gets wrong (a bf16 add -> NaN).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |kernel - reference| <= atol + rtol * |reference|, per dtype.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}
FORCE_SPARSE = dict(dense_below=0.0, max_tokens=1 << 30)


def backends() -> list:
    out = ["cpu"]
    if dispatch.HAS_TRITON and (dispatch.HAS_CUDA or dispatch.triton_interpreting()):
        out.append("triton")
    else:
        out.append(pytest.param("triton", marks=pytest.mark.skip(reason="triton not installed")))
    return out


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and dispatch.HAS_CUDA else "cpu"


def make_inputs(tokens, d_model, d_ff, sparsity, dtype, device, t=0.25, seed=0):
    """x, g, w1, w2t with exactly round((1 - sparsity) * d_ff) active neurons per token for
    FATReLU(t); a few active entries sit exactly on the threshold and a few just below it."""
    gen = torch.Generator().manual_seed(seed)
    active = round((1 - sparsity) * d_ff)
    g = -torch.rand(tokens, d_ff, generator=gen)  # inactive: below t
    for i in range(tokens):
        pick = torch.randperm(d_ff, generator=gen)
        on, off = pick[:active], pick[active:]
        g[i, on] = t + torch.rand(active, generator=gen)
        g[i, on[:3]] = t  # g == t is kept (paper Eq. (3))
        g[i, off[:3]] = t  # replaced below by the next value under t in the dtype
    g = g.to(dtype)
    below = torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(0.0)).to(dtype)
    if below.item() == t:  # nextafter in fp32 rounds back to t in fp16/bf16
        below = torch.tensor(t, dtype=dtype) - torch.finfo(dtype).eps * t
    for i in range(tokens):
        row = g[i]
        boundary = (row == t).nonzero().flatten()
        if active < d_ff:
            row[boundary[-min(3, d_ff - active):]] = below
    x = torch.randn(tokens, d_model, generator=gen).to(dtype)
    w1 = (torch.randn(d_ff, d_model, generator=gen) / d_model**0.5).to(dtype)
    w2t = (torch.randn(d_ff, d_model, generator=gen) / d_ff**0.5).to(dtype)
    return [v.to(device) for v in (x, g, w1, w2t)]


def assert_close(out, ref, dtype, what):
    atol, rtol = TOL[dtype]
    diff = (out.float() - ref.float()).abs()
    bad = diff > atol + rtol * ref.float().abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {diff.numel()} entries off; max diff {diff.max():.3g}, "
        f"mean diff {diff.mean():.3g}, max |ref| {ref.float().abs().max():.3g}"
    )


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tokens", [1, 3])
def test_steps_match_reference(backend, dtype, sparsity, tokens):
    x, g, w1, w2t = make_inputs(tokens, 67, 173, sparsity, dtype, device_for(backend))
    ref1 = reference.up_step(x, g, w1, "fatrelu", 0.25)
    out1 = dispatch.up_step(x, g, w1, "fatrelu", 0.25, backend=backend, **FORCE_SPARSE)
    a = reference.activate(g, "fatrelu", 0.25)
    assert out1.dtype == dtype and out1.shape == ref1.shape
    off = a == 0
    assert (out1[off] == 0).all(), "step 2 wrote non-zeros for inactive neurons"
    assert_close(out1, ref1, dtype, f"step 2 [{backend} {dtype} s={sparsity} tokens={tokens}]")
    ref3 = reference.down_step(ref1.float(), w2t.float())  # fp32 truth for the accumulation
    out3 = dispatch.down_step(ref1, w2t, backend=backend, **FORCE_SPARSE)
    assert out3.dtype == dtype
    assert_close(out3, ref3, dtype, f"step 3 [{backend} {dtype} s={sparsity} tokens={tokens}]")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fatrelu_boundary_kept_exactly(backend, dtype):
    x, g, w1, _ = make_inputs(1, 67, 173, 0.5, dtype, device_for(backend))
    out = dispatch.up_step(x, g, w1, "fatrelu", 0.25, backend=backend, **FORCE_SPARSE)
    on_t = g == 0.25
    below = (g < 0.25) & (g > 0.2)
    assert on_t.sum() >= 1 and below.sum() >= 1, "inputs lack boundary cases"
    assert (out[on_t] != 0).all(), "g == t must be kept (FATReLU keeps g >= t)"
    assert (out[below] == 0).all(), "g just below t must be dropped"
    # Same mask as the model's own FATReLU module, threshold rounded to the dtype.
    mask = FATReLU(0.25).to(x.device)(g) != 0
    assert torch.equal(out != 0, mask)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("act,param", [("relu", 0.0), ("fatrelu", 0.01), ("shifted_relu", 0.3),
                                       ("cats", 0.15), ("drelu", 0.0), ("drelu", 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_activation(backend, act, param, dtype):
    gen = torch.Generator().manual_seed(1)
    dev = device_for(backend)
    x = torch.randn(2, 300, generator=gen).to(dtype).to(dev)  # > one 128-wide block of d_model
    g = torch.randn(2, 517, generator=gen).to(dtype).to(dev)
    w1 = (torch.randn(517, 300, generator=gen) / 17).to(dtype).to(dev)
    w2t = (torch.randn(517, 300, generator=gen) / 23).to(dtype).to(dev)
    a = reference.activate(g, act, param)
    ref = reference.down_step(reference.up_step(x, g, w1, act, param).float(), w2t.float())
    x1 = dispatch.up_step(x, g, w1, act, param, backend=backend, **FORCE_SPARSE)
    want = reference.up_step(x, g, w1, act, param) != 0
    if act == "drelu":  # zero where either factor is: the gate's, and relu(u)'s
        assert want.sum() < (a != 0).sum() and not (want & (a == 0)).any()
    else:
        assert torch.equal(want, a != 0)
    assert torch.equal(x1 != 0, want), f"{act}: zeros differ from the reference"
    y = dispatch.sparse_ffn(x, g, w1, w2t, act, param, backend=backend, **FORCE_SPARSE)
    assert_close(y, ref, dtype, f"sparse_ffn {act} {backend} {dtype}")


def test_reference_matches_model_formula():
    """The reference is the Hugging Face FFN formula: act_fn(gate) * up, then down."""
    torch.manual_seed(0)
    x, g, w1, w2t = make_inputs(2, 64, 96, 0.5, torch.float32, "cpu")
    expected = (FATReLU(0.25)(g) * (x @ w1.T)) @ w2t
    got = reference.down_step(reference.up_step(x, g, w1, "fatrelu", 0.25), w2t)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unrepresentable_threshold_rounds_like_the_module(backend, dtype):
    """t = 0.01 is not exact in any dtype: kernels must round it as FATReLU(0.01) does."""
    t = torch.tensor(0.01, dtype=dtype)
    ulp = torch.finfo(dtype).eps * 0.01
    g = torch.stack([t - ulp, t, t + ulp, t - 2 * ulp, t + 2 * ulp]).to(dtype).repeat(7)[None]
    g = g.to(device_for(backend))
    x = torch.ones(1, 5, dtype=dtype, device=g.device)
    w1 = torch.ones(g.shape[1], 5, dtype=dtype, device=g.device)
    out = dispatch.up_step(x, g, w1, "fatrelu", 0.01, backend=backend, **FORCE_SPARSE)
    mask = FATReLU(0.01)(g) != 0
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(out != 0, mask), f"{dtype}: kept {out != 0} vs module {mask}"


@pytest.mark.parametrize("tokens", [1, 3])
def test_cpu_step2_in_several_chunks(tokens, monkeypatch):
    """The CPU gather runs in L2-sized chunks; shrink them so 173 active rows take 11."""
    from prosparse.kernels import cpu

    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)
    x, g, w1, _ = make_inputs(tokens, 67, 173, 0.0, torch.float32, "cpu")
    out = dispatch.up_step(x, g, w1, "fatrelu", 0.25, backend="cpu", **FORCE_SPARSE)
    assert_close(out, reference.up_step(x, g, w1, "fatrelu", 0.25), torch.float32, "chunked")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_predicted_ffn_matches_reference(backend, dtype, share, bias):
    # the predictor-driven gather (gate, up and down rows of the predicted neurons only)
    # against the masked dense formula, each of 3 tokens with its own mask
    gen = torch.Generator().manual_seed(2)
    dev = device_for(backend)
    tokens, d_model, d_ff = 3, 67, 173

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(dev)

    x = rand(tokens, d_model)
    wg, wu = rand(d_ff, d_model, scale=d_model**-0.5), rand(d_ff, d_model, scale=d_model**-0.5)
    w2t = rand(d_ff, d_model, scale=d_ff**-0.5)
    bg, bu = (rand(d_ff), rand(d_ff)) if bias else (None, None)
    mask = (torch.rand(tokens, d_ff, generator=gen) < share).to(dev)
    ref = reference.predicted_ffn(x.float(), mask, wg.float(), wu.float(), w2t.float(),
                                  "fatrelu", 0.05, None if bg is None else bg.float(),
                                  None if bu is None else bu.float())
    out = dispatch.predicted_ffn(x, mask, wg, wu, w2t, "fatrelu", 0.05, bg, bu,
                                 backend=backend, max_tokens=tokens)
    assert out.dtype == dtype and out.shape == (tokens, d_model)
    assert_close(out, ref, dtype, f"predicted_ffn [{backend} {dtype} share={share}]")
    if share == 0.0:
        assert (out == 0).all(), "no neuron predicted active must give an exact zero"


@pytest.mark.parametrize("backend", ["reference", *backends()])
@pytest.mark.parametrize("act,param", [("relu", 0.0), ("fatrelu", 0.25), ("shifted_relu", 0.1),
                                       ("cats", 0.1), ("drelu", 0.1)])
def test_nan_gate_gives_nan_like_the_dense_module(backend, act, param):
    # IEEE semantics on every path: a NaN gate is NaN in x1 (as act(g) * u is in the dense
    # FFN), never an exact zero that would hide it
    from prosparse.models.activations import make_activation

    dev = device_for(backend)
    x, g, w1, w2t = make_inputs(1, 67, 173, 0.5, torch.float32, dev)
    g[0, 5] = float("nan")
    module_x1 = make_activation(act, param).to(dev)(g) * (x @ w1.T)
    x1 = dispatch.up_step(x, g, w1, act, param, backend=backend, **FORCE_SPARSE)
    assert torch.isnan(module_x1[0, 5]) and torch.isnan(x1[0, 5])
    assert torch.equal(torch.isnan(x1), torch.isnan(module_x1))
    assert torch.isnan(dispatch.sparse_ffn(x, g, w1, w2t, act, param, backend=backend,
                                           **FORCE_SPARSE)).all()


@pytest.mark.parametrize("backend", backends())
def test_mismatched_shapes_are_errors_not_out_of_bounds_reads(backend):
    dev = device_for(backend)
    x, g, w1, w2t = make_inputs(1, 64, 96, 0.5, torch.float32, dev)
    bad = {
        "x narrower than w1": (x[:, :63], g, w1, w2t),
        "g wider than w1": (x, torch.cat([g, g[:, :1]], 1), w1, w2t),
        "g narrower than w1": (x, g[:, :95], w1, w2t),
        "w2t of another d_ff": (x, g, w1, w2t[:95]),
        "tokens differ": (torch.cat([x, x]), g, w1, w2t),
        "dtypes differ": (x, g, w1.double(), w2t),
    }
    for what, args in bad.items():
        try:
            dispatch.sparse_ffn(*args, "relu", 0.0, backend=backend, **FORCE_SPARSE)
        except ValueError as e:
            assert any(k in str(e) for k in ("must be", "disagree", "cast")), (what, e)
        else:
            pytest.fail(f"{what}: accepted")
    with pytest.raises(ValueError, match="mask"):
        dispatch.predicted_ffn(x, torch.ones(1, 95, dtype=torch.bool, device=dev), w1, w1, w2t,
                               backend=backend)


@pytest.mark.parametrize("backend", ["reference", *backends()])
def test_drelu_predicted_ffn_rectifies_the_up_projection(backend):
    gen = torch.Generator().manual_seed(5)
    dev = device_for(backend)
    x = torch.randn(1, 96, generator=gen).to(dev)
    wg, wu, w2t = [(torch.randn(130, 96, generator=gen) / 10).to(dev) for _ in range(3)]
    mask = (torch.rand(1, 130, generator=gen) < 0.5).to(dev)
    g, u = x @ wg.t(), x @ wu.t()
    want = ((torch.relu(g) * torch.relu(u) * mask) @ w2t)  # dReLU by hand
    out = dispatch.predicted_ffn(x, mask, wg, wu, w2t, "drelu", 0.0, backend=backend,
                                 max_tokens=8)
    assert_close(out, want, torch.float32, f"drelu predicted [{backend}]")
