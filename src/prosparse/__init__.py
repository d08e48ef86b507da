"""prosparse: high, controllable activation sparsity for gated-FFN LLMs, and sparse inference."""

from prosparse.core import __version__
from prosparse.core.errors import UsageError
from prosparse.models import FATReLU, find_gated_ffns, load_model, relufy_, save_model

__all__ = [
    "FATReLU",
    "SparseMLP",
    "attach_predictors_",
    "generate",
    "measure_sparsity",
    "ppl_p_sparsity",
    "UsageError",
    "find_gated_ffns",
    "load_model",
    "relufy_",
    "save_model",
    "sparsify_",
    "__version__",
]


def __getattr__(name: str):
    # Sparse inference is imported on first use so `import prosparse` stays light.
    if name in ("SparseMLP", "sparsify_", "attach_predictors_", "generate"):
        from prosparse import inference

        return getattr(inference, name)
    if name == "measure_sparsity":
        from prosparse.measure.sparsity import measure_sparsity

        return measure_sparsity
    if name == "ppl_p_sparsity":
        from prosparse.measure.cett import ppl_p_sparsity

        return ppl_p_sparsity
    raise AttributeError(f"module 'prosparse' has no attribute {name!r}")
