"""prox_2of4 against an independent brute-force minimiser; the regulariser against its formula."""

from __future__ import annotations

import itertools

import pytest
import torch

from prosparse.core.errors import UsageError
from prosparse.pruning import prox_2of4, regularizer_2of4
from prosparse.pruning.prox import prox_objective


def brute_force(z: torch.Tensor, lam: float, k: int = 17, polish: int = 300) -> torch.Tensor:
    """Global minimiser of 0.5||w - z||^2 + lam R(w) per row of z (groups, 4), by a grid.

    The minimiser has z's signs and |w_i| in [0, |z_i|]; over a k^3 grid of (w1, w2, w3) in that
    box, w4 is the exact minimiser given the others (a convex quadratic in w4); the best grid
    point is then polished by exact coordinate updates in fp64. No support enumeration.
    """
    a = z.abs().double()
    t = torch.linspace(0, 1, k, dtype=torch.float64)
    grid = torch.stack([g.flatten() for g in torch.meshgrid(t, t, t, indexing="ij")], 1)
    best = torch.empty_like(a)
    for s in range(0, len(a), 128):
        ac = a[s:s + 128]
        w = grid.unsqueeze(0) * ac[:, None, :3]  # (g, k^3, 3)
        e2 = w[..., 0] * w[..., 1] + w[..., 1] * w[..., 2] + w[..., 0] * w[..., 2]
        w4 = (ac[:, None, 3] - lam * e2).clamp(min=0)
        full = torch.cat([w, w4.unsqueeze(-1)], -1)  # (g, k^3, 4)
        r = sum(full[..., i] * full[..., j] * full[..., k_]
                for i, j, k_ in itertools.combinations(range(4), 3))
        f = 0.5 * (full - ac[:, None]).square().sum(-1) + lam * r
        best[s:s + 128] = full[torch.arange(len(ac)), f.argmin(1)]
    w = best
    for _ in range(polish):
        for i in range(4):
            o = [j for j in range(4) if j != i]
            e2 = w[:, o[0]] * w[:, o[1]] + w[:, o[1]] * w[:, o[2]] + w[:, o[0]] * w[:, o[2]]
            w[:, i] = (a[:, i] - lam * e2).clamp(min=0)
    return (w * z.sign().double()).float()


def keep_top2(z: torch.Tensor) -> torch.Tensor:
    drop = z.abs().topk(2, dim=1, largest=False).indices
    return z.clone().scatter_(1, drop, 0.0)


@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_prox_matches_brute_force(lam, dist):
    gen = torch.Generator().manual_seed(int(lam * 100) + len(dist))
    z = torch.randn(1000, 4, generator=gen)
    if dist == "laplace":
        z = z * torch.rand(1000, 4, generator=gen).log().neg()
    w = prox_2of4(z, lam)
    wb = brute_force(z, lam)
    f, fb = prox_objective(w, z, lam).flatten(), prox_objective(wb, z, lam).flatten()
    f2 = prox_objective(keep_top2(z), z, lam).flatten()
    gap = f - fb
    assert (f <= f2 + 1e-6).all(), f"worse than keep-top-2 by up to {(f - f2).max():.3g}"
    bad = gap > 1e-5 * fb.clamp(min=1)
    assert not bad.any(), (f"{int(bad.sum())} of {len(z)} groups above the brute force: max "
                           f"{gap.max():.3g}, mean {gap.clamp(min=0).mean():.3g}; first "
                           f"z={z[bad][0].tolist()}")
    # Each group is at most 2 non-zeros exactly where the brute force is (up to its grid).
    assert w.shape == z.shape and w.dtype == z.dtype
    assert ((w != 0).sum(1) <= 2).float().mean() >= ((wb.abs() > 1e-6).sum(1) <= 2).float().mean() - 0.01


def test_prox_small_lambda_regime_and_chunks():
    # LLM-like weights over more groups than one chunk: nearly every group convex.
    z = torch.randn(300, 4 * 300, generator=torch.Generator().manual_seed(0)) * 0.05
    w = prox_2of4(z, 0.25)
    assert (prox_objective(w, z, 0.25) <= prox_objective(z, z, 0.25) + 1e-9).all()
    # The stationarity of each non-zero coordinate: w_i = z_i - lam * sign * e2(others).
    a, wa = z.abs().view(-1, 4), w.abs().view(-1, 4)
    for i in range(4):
        o = [j for j in range(4) if j != i]
        e2 = wa[:, o[0]] * wa[:, o[1]] + wa[:, o[1]] * wa[:, o[2]] + wa[:, o[0]] * wa[:, o[2]]
        expect = (a[:, i] - 0.25 * e2).clamp(min=0)
        torch.testing.assert_close(wa[:, i], expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prox_half_precision_computes_in_fp32(dtype):
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    w = prox_2of4(z.to(dtype), 0.5)
    assert w.dtype == dtype and w.shape == z.shape
    ref = prox_2of4(z.to(dtype).float(), 0.5).to(dtype)
    assert torch.equal(w, ref)


def test_prox_edges():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(prox_2of4(z, 0.0), z)
    w = prox_2of4(z, 10.0)
    assert torch.equal(w[:2], z[:2])  # already 2:4: unchanged (R = 0 there)
    assert int((w[2] != 0).sum()) == 2  # ties: two kept, values unchanged
    assert sorted(w[2].tolist()) == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(UsageError, match="must be >= 0"):
        prox_2of4(z, -0.1)
    with pytest.raises(UsageError, match="divisible by 4"):
        prox_2of4(torch.ones(2, 6), 0.1)


def test_regularizer_formula_and_zero_set():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    g = w.view(-1, 4)
    w1, w2, w3, w4 = g.unbind(1)
    expect = ((w1 * w2 * w3).abs() + (w2 * w3 * w4).abs() + (w3 * w4 * w1).abs()
              + (w4 * w1 * w2).abs())
    torch.testing.assert_close(regularizer_2of4(w, reduce=False).flatten(), expect)
    torch.testing.assert_close(regularizer_2of4(w), expect.sum())
    sparse = keep_top2(g).view_as(w)
    assert regularizer_2of4(sparse) == 0
    three = g.clone()
    three[:, 0] = 0
    assert (regularizer_2of4(three.view_as(w), reduce=False) > 0).all()
    w.requires_grad_(True)
    regularizer_2of4(w).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_early_stopping_keeps_the_masks_the_validation_text_liked_best(tmp_path):
    """With val_samples the masks are chosen by the deployed model (original weights, learned
    masks) on held-back calibration blocks: the chosen step is the best one logged."""
    from prosparse import save_model
    from prosparse.pruning import PruneConfig, prune
    from tests.conftest import char_tokenizer, tiny_llama

    save_model(tiny_llama(), char_tokenizer(), tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"alpha beta {i} gamma delta sparse." * 6 for i in range(80)))
    cfg = PruneConfig(model=str(tmp_path / "m"), method="proxsparse", data=f"c={corpus}",
                      samples=6, seq_len=32, eval_data=f"c={corpus}", eval_tokens=128,
                      eval_seq_len=32)
    cfg.prox.val_samples, cfg.prox.val_every, cfg.prox.lr = 2, 2, 3e-2
    result = prune(cfg, tmp_path / "o", progress=False)
    log = result["proxsparse"]
    ppls = [v["perplexity"] for v in log["validation"]]
    assert [v["step"] for v in log["validation"]] == [2, 4, 6]
    assert log["chosen_validation_perplexity"] == min(ppls)
    assert log["chosen_step"] == log["validation"][ppls.index(min(ppls))]["step"]
    assert result["samples"] == 6 and result["compliance"] == 1.0
