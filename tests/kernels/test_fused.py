"""The compiled CPU kernels (kernels/fused.py, csrc/sparse_ffn.cpp) against the plain-torch
reference, across odd shapes, sparsity 0 and 1, dtypes and thread counts; and the fallback to
the pure-torch twin when the extension cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from prosparse.kernels import cpu, dispatch, fused, reference
from tests.kernels.test_operators import assert_close  # shared tolerances per dtype

# |kernel - reference| <= atol + rtol * |reference|, per dtype (fp32 accumulation either way).
DTYPES = [torch.float32, torch.bfloat16]
# d_model off every vector width (16/32), one that is, and d_ff odd.
SHAPES = [(67, 173), (4 * 32, 97), (300, 517)]
THREADS = [1, 2, 3]


def needs_extension():
    if not fused.available():
        pytest.skip(f"compiled CPU kernels unavailable: {fused.unavailable_reason()}")


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def inputs(tokens, d_model, d_ff, sparsity, dtype, seed=0):
    """x, g, w1, w2t with round((1 - sparsity) * d_ff) neurons of each token active for ReLU."""
    gen = torch.Generator().manual_seed(seed)
    active = round((1 - sparsity) * d_ff)
    g = -torch.rand(tokens, d_ff, generator=gen) - 0.01
    for t in range(tokens):
        pick = torch.randperm(d_ff, generator=gen)[:active]
        g[t, pick] = torch.rand(active, generator=gen) + 0.01
    x = torch.randn(tokens, d_model, generator=gen)
    w1 = torch.randn(d_ff, d_model, generator=gen) / d_model**0.5
    w2t = torch.randn(d_ff, d_model, generator=gen) / d_ff**0.5
    return [v.to(dtype) for v in (x, g, w1, w2t)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_model,d_ff", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tokens", [1, 2])
def test_fused_steps_match_reference(dtype, d_model, d_ff, sparsity, tokens, threads):
    needs_extension()
    x, g, w1, w2t = inputs(tokens, d_model, d_ff, sparsity, dtype)
    idx = reference.active_neurons(torch.relu(g))
    ref1 = reference.up_step(x, g, w1)
    ref3 = reference.down_step(ref1.float(), w2t.float())  # fp32 truth for the accumulation
    case = f"{dtype} {d_model}x{d_ff} s={sparsity} tokens={tokens}"
    outs1, outs3 = [], []
    for n in THREADS:
        threads(n)
        x1 = fused.up_step(x, g, w1, idx)
        assert x1.dtype == dtype and x1.shape == ref1.shape
        assert torch.equal(x1 != 0, ref1 != 0), f"step 2 active set differs [{case}, {n} threads]"
        assert_close(x1, ref1, dtype, f"step 2 [{case}, {n} threads]")
        y = fused.down_step(ref1, w2t, idx)
        assert y.dtype == dtype and y.shape == (tokens, d_model)
        assert_close(y, ref3, dtype, f"step 3 [{case}, {n} threads]")
        outs1.append(x1)
        outs3.append(y)
    # Rows split across threads for step 2, columns for step 3: each output element is summed
    # in one order whatever the thread count, so greedy decoding does not depend on it.
    for n, a, b in zip(THREADS[1:], outs1[1:], outs3[1:]):
        assert torch.equal(a, outs1[0]), f"step 2 at {n} threads differs from 1 thread [{case}]"
        assert torch.equal(b, outs3[0]), f"step 3 at {n} threads differs from 1 thread [{case}]"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,param", [("relu", 0.0), ("fatrelu", 0.25), ("fatrelu", 0.01),
                                       ("shifted_relu", 0.3)])
def test_activation_in_kernel_rounds_like_the_reference(dtype, act, param):
    needs_extension()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 300, generator=gen).to(dtype)
    g = torch.randn(1, 517, generator=gen).to(dtype)
    t = torch.tensor(param, dtype=dtype)  # entries on the rounded threshold and one ulp below
    g[0, :4] = t
    g[0, 4:8] = torch.nextafter(t, torch.tensor(-1.0, dtype=dtype))
    w1 = (torch.randn(517, 300, generator=gen) / 17).to(dtype)
    a = reference.activate(g, act, param)
    x1 = fused.up_step(x, g, w1, reference.active_neurons(a), act, param)
    ref = reference.up_step(x, g, w1, act, param)
    assert torch.equal(x1 != 0, ref != 0), f"{act}({param}) {dtype}: active set differs"
    assert_close(x1, ref, dtype, f"{act}({param}) {dtype}")


def test_other_activations_arrive_activated():
    """An activation the kernel does not compute (any name outside NATIVE_ACTS) reaches it as
    act(g) computed by torch (code 3): the kernel takes those values as they are."""
    needs_extension()
    x, g, w1, _ = inputs(1, 67, 173, 0.5, torch.float32)
    idx = reference.active_neurons(torch.relu(g))
    x1 = torch.ops.prosparse.up_step(x, torch.relu(g) * 3, w1, idx, 3, 0.0)
    torch.testing.assert_close(x1, reference.up_step(x, g, w1) * 3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_predicted_ffn_matches_reference(dtype, share, bias, threads):
    needs_extension()
    gen = torch.Generator().manual_seed(2)
    tokens, d_model, d_ff = 3, 67, 173

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = rand(tokens, d_model)
    wg, wu = rand(d_ff, d_model, scale=d_model**-0.5), rand(d_ff, d_model, scale=d_model**-0.5)
    w2t = rand(d_ff, d_model, scale=d_ff**-0.5)
    bg, bu = (rand(d_ff), rand(d_ff)) if bias else (None, None)
    mask = torch.rand(tokens, d_ff, generator=gen) < share
    ref = reference.predicted_ffn(x.float(), mask, wg.float(), wu.float(), w2t.float(),
                                  "fatrelu", 0.05, None if bg is None else bg.float(),
                                  None if bu is None else bu.float())
    outs = []
    for n in THREADS:
        threads(n)
        out = fused.predicted_ffn(x, mask, wg, wu, w2t, "fatrelu", 0.05, bg, bu)
        assert out.dtype == dtype and out.shape == (tokens, d_model)
        assert_close(out, ref, dtype, f"predicted_ffn [{dtype} share={share} {n} threads]")
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), "thread count changed the result"
    if share == 0.0:
        assert (outs[0] == 0).all(), "no neuron predicted active must give an exact zero"


@pytest.mark.parametrize("act,param", [("relu", 0.0), ("fatrelu", 0.25), ("shifted_relu", 0.1)])
def test_nan_gate_is_nan_as_in_the_reference(act, param):
    needs_extension()
    x, g, w1, w2t = inputs(1, 67, 173, 0.5, torch.float32)
    g[0, 5] = float("nan")
    a = reference.activate(g, act, param)
    idx = reference.active_neurons(a)
    ref1 = reference.up_step(x, g, w1, act, param)
    x1 = fused.up_step(x, g, w1, idx, act, param)
    assert torch.equal(torch.isnan(x1), torch.isnan(ref1)) and torch.isnan(x1[0, 5])
    assert torch.equal(fused.down_step(x1, w2t, idx).isnan(), reference.down_step(ref1, w2t).isnan())
    # predicted FFN: a NaN gate bias on a predicted neuron makes the whole output NaN
    mask = torch.zeros(1, 173, dtype=torch.bool)
    mask[0, :40] = True
    bg = torch.zeros(173)
    bg[7] = float("nan")
    out = fused.predicted_ffn(x, mask, w1, w1, w2t, act, param, bg, None)
    ref = reference.predicted_ffn(x, mask, w1, w1, w2t, act, param, bg, None)
    assert out.isnan().all() and ref.isnan().all()


def test_cpu_backend_runs_the_fused_kernels_and_disabled_runs_the_twin(monkeypatch):
    """backend='cpu' takes the compiled ops when they are built; fused.disabled() and dtypes
    they do not take (fp16) take the pure-torch code; both agree with each other."""
    needs_extension()
    calls = []
    for name in ("up_step", "down_step"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name, **k: calls.append(_n)
                            or _r(*a, **k))
    x, g, w1, w2t = inputs(1, 67, 173, 0.9, torch.bfloat16)
    force = dict(backend="cpu", dense_below=0.0, max_tokens=8)
    y = dispatch.sparse_ffn(x, g, w1, w2t, **force)
    assert calls == ["up_step", "down_step"]
    calls.clear()
    with fused.disabled():
        y_torch = dispatch.sparse_ffn(x, g, w1, w2t, **force)
    assert fused.ENABLED and calls == []
    dispatch.sparse_ffn(*(v.half() for v in (x, g, w1, w2t)), **force)
    assert calls == [], "fp16 must take the pure-torch kernels"
    assert_close(y, y_torch, torch.bfloat16, "fused vs pure-torch twin")
    assert dispatch.resolve_backend("cpu", "fused") == "fused"


def test_missing_compiler_falls_back_to_pure_torch_with_one_line(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension 'prosparse_fused': c++: not found\nmore")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(fused, "_state", {})  # as in a fresh process
    x, g, w1, w2t = inputs(1, 67, 173, 0.8, torch.float32)
    force = dict(dense_below=0.0, max_tokens=8)
    with caplog.at_level(logging.WARNING, logger="prosparse.kernels.fused"):
        y = dispatch.sparse_ffn(x, g, w1, w2t, backend="cpu", **force)
        y2 = dispatch.sparse_ffn(x, g, w1, w2t, **force)
    lines = [r.getMessage() for r in caplog.records if r.name == "prosparse.kernels.fused"]
    assert len(lines) == 1, lines
    assert "c++: not found" in lines[0] and "pure-torch" in lines[0] and "\n" not in lines[0]
    assert not fused.available() and "c++: not found" in fused.unavailable_reason()
    ref = reference.down_step(reference.up_step(x, g, w1), w2t)
    assert_close(y, ref, torch.float32, "fallback")
    assert torch.equal(y, y2)
    with pytest.raises(ValueError, match="did not build.*c\\+\\+: not found"):
        dispatch.resolve_backend("cpu", "fused")


def test_isa_flags_follow_the_cpu_and_the_override(monkeypatch):
    monkeypatch.delenv("PROSPARSE_CPU_ISA", raising=False)
    monkeypatch.setattr(fused, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f",
                                                     "avx512bw", "avx512vl", "avx512dq"})
    assert "-mavx512f" in fused.isa_flags()
    monkeypatch.setattr(fused, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f"})
    assert fused.isa_flags() == ["-mavx2", "-mfma", "-mf16c"]
    monkeypatch.setattr(fused, "cpu_flags", set)
    assert fused.isa_flags() == []
    monkeypatch.setenv("PROSPARSE_CPU_ISA", "avx2")
    assert fused.isa_flags() == ["-mavx2", "-mfma", "-mf16c"]
    with pytest.raises(KeyError, match="choose one of avx512, avx2, generic"):
        fused.isa_flags("sse9")


def test_cpu_isa_lists_the_speed_relevant_features_in_a_fixed_order(monkeypatch):
    monkeypatch.setattr(fused, "cpu_flags", lambda: {"sse2", "avx512_bf16", "fma", "avx2"})
    assert fused.cpu_isa() == ["avx2", "fma", "avx512_bf16"]
    monkeypatch.setattr(fused, "cpu_flags", lambda: {"asimd", "fp"})
    assert fused.cpu_isa() == ["neon"]
    monkeypatch.setattr(fused, "cpu_flags", set)
    assert fused.cpu_isa() == []


def test_build_is_cached_under_a_hashed_directory():
    needs_extension()
    path = fused._state["path"]
    assert "ext-" in path and path.endswith(".so")
    assert fused._build() == path, "a second build must find the cached library"


def test_cpu_twin_is_untouched_pure_torch(monkeypatch):
    """Inside fused.disabled() the CPU backend is the pure-torch code, tied to the reference."""
    x, g, w1, w2t = inputs(2, 67, 173, 0.7, torch.float32)
    idx = reference.active_neurons(torch.relu(g))
    with fused.disabled():
        x1 = cpu.up_step(x, g, w1, idx)
        y = cpu.down_step(x1, w2t, idx)
    assert_close(x1, reference.up_step(x, g, w1), torch.float32, "twin step 2")
    assert_close(y, reference.down_step(x1, w2t), torch.float32, "twin step 3")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,param", [("relu", 0.0), ("fatrelu", 0.25), ("shifted_relu", 0.3),
                                       (None, 0.0)])
@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_fused_active_set_is_the_reference_union(dtype, act, param, tokens):
    """prosparse::active (one pass) gives reference.active_neurons(activate(g)): the sorted
    union over tokens, NaN active, -0.0 and values on or just under the threshold as torch."""
    needs_extension()
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(tokens, 517, generator=gen).to(dtype)
    t = torch.tensor(param, dtype=dtype)
    g[0, :3] = t
    g[0, 3:6] = torch.nextafter(t, torch.tensor(-1.0, dtype=dtype))
    g[-1, 6] = float("nan")
    g[:, 7] = -0.0
    g[:, 8:12] = 0.0  # never active
    want = reference.active_neurons(g if act is None else reference.activate(g, act, param))
    got = fused.active_neurons(g, act, param)
    assert got.dtype == torch.int64 and torch.equal(got, want), f"{act} {dtype} {tokens} tokens"
    assert fused.active_neurons(torch.zeros(tokens, 33, dtype=dtype), act, 0.0).numel() == 0
    assert torch.equal(fused.active_neurons(torch.ones(tokens, 33, dtype=dtype), act, 0.0),
                       torch.arange(33))
    assert torch.equal(dispatch.active_set("cpu", g, act, param), want)
    with fused.disabled():  # the pure-torch twin takes the reference's four ops
        assert torch.equal(dispatch.active_set("cpu", g, act, param), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_model", [67, 128, 300])
def test_step2_row_does_not_depend_on_its_group(dtype, d_model):
    """Step (2) dots several active rows per pass; each row keeps its own accumulators and the
    tail is explicit FMAs, so a row alone, in a short group or in a full one (wherever a
    thread's rows begin and end) gives the same bits."""
    needs_extension()
    x, g, w1, _ = inputs(1, d_model, 61, 0.0, dtype, seed=4)
    idx = torch.arange(61)
    full = fused.up_step(x, g, w1, idx)
    for m in range(1, 10):
        for start in range(0, 61 - m, 7):
            sub = idx[start:start + m]
            part = fused.up_step(x, g, w1, sub)
            assert torch.equal(part[0, sub], full[0, sub]), f"{dtype} rows {start}..+{m}"
            rest = torch.ones(61, dtype=torch.bool)
            rest[sub] = False
            assert (part[0, rest] == 0).all()


def test_compile_flags_take_the_tuning_knobs(monkeypatch):
    monkeypatch.setenv("PROSPARSE_CPU_ISA", "avx2")
    monkeypatch.setenv("PROSPARSE_CPU_CFLAGS", "-DPROSPARSE_UP_ROWS=1  -DPROSPARSE_DOWN_ROWS=8")
    flags = fused.compile_flags()
    assert flags[-2:] == ["-DPROSPARSE_UP_ROWS=1", "-DPROSPARSE_DOWN_ROWS=8"]
    assert "-mavx2" in flags and "-fopenmp" in flags
    monkeypatch.delenv("PROSPARSE_CPU_CFLAGS")
    assert not any(f.startswith("-DPROSPARSE") for f in fused.compile_flags())
