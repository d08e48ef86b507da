"""2:4 linears on sparse tensor cores against their masked dense twins (CUDA 8.0+ only)."""

from __future__ import annotations

import pytest
import torch

from prosparse.core.errors import UsageError
from prosparse.pruning import prunable_linears, to_semi_structured_
from prosparse.pruning.baselines import magnitude_prune_
from prosparse.pruning.semi_structured import SemiStructuredLinear, unavailable_reason

REASON = unavailable_reason()

def test_without_cuda_the_swap_says_why(llama):
    if REASON is None:
        pytest.skip("CUDA is available: the GPU tests below cover the swap")
    magnitude_prune_(prunable_linears(llama), 2, 4)
    with pytest.raises(UsageError, match="needs CUDA|compute capability"):
        to_semi_structured_(llama)

@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matches_masked_dense(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=True).cuda().to(dtype)
    magnitude_prune_({"x": lin}, 2, 4)
    fast = SemiStructuredLinear.from_dense(lin)
    x = torch.randn(3, 64, 256, device="cuda", dtype=dtype)
    ref, out = lin(x), fast(x)
    diff = (out.float() - ref.float()).abs()
    assert diff.max() < 2e-2 * ref.float().abs().max(), (f"max {diff.max():.3g}, mean "
                                                         f"{diff.mean():.3g}")

@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_to_semi_structured_swaps_only_exact_2of4(llama):
    model = llama.cuda().half()
    linears = prunable_linears(model)
    magnitude_prune_({k: v for k, v in linears.items() if "layers.0." in k}, 2, 4)
    ids = torch.randint(2, 128, (1, 64), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    report = to_semi_structured_(model)
    assert all("layers.0." in n for n in report["converted"]) and len(report["converted"]) == 7
    assert all("layers.1." in n for n in report["skipped"])
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    assert (out - ref).abs().max() < 5e-2 * ref.abs().max()

def test_cpu_model_is_refused_when_cuda_exists(llama):
    if REASON is not None:
        pytest.skip(REASON)
    with pytest.raises(UsageError, match="move it to CUDA"):
        to_semi_structured_(llama)
