"""prosparse: high, controllable activation sparsity for gated-FFN LLMs, and sparse inference."""

from prosparse.models import FATReLU, find_gated_ffns, load_model, relufy_, save_model

__version__ = "0.1.0"

__all__ = ["FATReLU", "find_gated_ffns", "load_model", "relufy_", "save_model", "__version__"]
