"""rows_mv, the chunked gather-multiply that step (2) and the predictor-driven FFN share."""

from __future__ import annotations

import pytest
import torch

from prosparse.kernels import cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64 * 4 * 20])  # one chunk; many, ragged last
def test_rows_mv_is_the_gathered_product(monkeypatch, dtype, chunk_bytes):
    monkeypatch.setattr(cpu, "CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=gen).to(dtype)
    x = torch.randn(64, generator=gen).to(dtype)
    idx = torch.randperm(300, generator=gen)[:137].sort().values
    want = (w.float()[idx] @ x.float())
    got = cpu.rows_mv(w, idx, x)
    assert got.shape == (137,) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    xs = torch.randn(3, 64, generator=gen).to(dtype)  # several tokens: one GEMM per chunk
    torch.testing.assert_close(cpu.rows_mv(w, idx, xs).float(), xs.float() @ w.float()[idx].T,
                               rtol=tol, atol=tol)
    assert cpu.rows_mv(w, idx[:0], x).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_either_way_is_the_product(dtype):
    from prosparse.kernels.dense import _LINEAR_FASTER, matvec

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=gen).to(dtype)
    x = torch.randn(24, generator=gen).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for layout in (w, w.t().contiguous().t()):  # contiguous and transposed storage
        key = (dtype, layout.is_contiguous())
        for choice in (True, False):  # F.linear and torch.mv give the same product
            _LINEAR_FASTER[key] = choice
            torch.testing.assert_close(matvec(layout, x).float(), w.float() @ x.float(),
                                       rtol=tol, atol=tol)
        del _LINEAR_FASTER[key]
    assert matvec(w, x).shape == (40,) and (dtype, True) in _LINEAR_FASTER  # timed once, kept
