"""Activations, the in-place ReLU swap, loading and saving."""

from prosparse.models.activations import FATReLU, ShiftedReLU, fatrelu, register_with_transformers
from prosparse.models.loading import DEFAULT_MODEL, load_model
from prosparse.models.relufy import GatedFFN, find_gated_ffns, relufy_
from prosparse.models.saving import save_model

register_with_transformers()

__all__ = [
    "DEFAULT_MODEL",
    "FATReLU",
    "GatedFFN",
    "ShiftedReLU",
    "fatrelu",
    "find_gated_ffns",
    "load_model",
    "relufy_",
    "save_model",
]
