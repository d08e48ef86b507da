"""ReLU-family activations for ReLUfied gated FFNs, and their registration with transformers.

FATReLU keeps ``g >= t`` (paper Eq. (3); the released Hugging Face code does the same). Every
kernel in :mod:`prosparse.kernels` must agree with :func:`fatrelu` exactly, boundary included.

A ReLUfied checkpoint names its activation in the config: ``hidden_act: "relu"`` for a plain ReLU
(plain transformers loads it unchanged), ``hidden_act: "fatrelu"`` with ``hidden_act_param: t``
otherwise, or the legacy string ``"fatrelu_<t>"``. The threshold is also a buffer in the state
dict (``...mlp.act_fn.threshold``), so transformers restores it exactly once ``prosparse`` is
imported, even without our loader.
"""

from __future__ import annotations

import torch
from torch import nn


def fatrelu(g: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The reference FATReLU: ``g`` where ``g >= threshold``, exact zero elsewhere."""
    return torch.where(g >= threshold, g, torch.zeros((), dtype=g.dtype, device=g.device))


def shifted_relu(g: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """The shifted-ReLU baseline (ReLU Strikes Back): ``relu(g - shift)``."""
    return torch.relu(g - shift)


class FATReLU(nn.Module):
    """``act(g) = g if g >= threshold else 0``; the threshold is a persistent buffer."""

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        if threshold < 0:
            raise ValueError(f"FATReLU threshold ({threshold}) must be >= 0")
        self.register_buffer("threshold", torch.tensor(float(threshold)), persistent=True)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return fatrelu(g, self.threshold.to(g.dtype))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():g}"


class ShiftedReLU(nn.Module):
    """``act(g) = relu(g - shift)``; the shift is a persistent buffer."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.register_buffer("shift", torch.tensor(float(shift)), persistent=True)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return shifted_relu(g, self.shift.to(g.dtype))

    def extra_repr(self) -> str:
        return f"shift={self.shift.item():g}"


ACTIVATIONS = ("relu", "fatrelu", "shifted_relu")


def make_activation(act: str, threshold: float = 0.0, shift: float = 0.0) -> nn.Module:
    """Build the activation module named ``act`` (one of :data:`ACTIVATIONS`)."""
    if act == "relu":
        if threshold:
            raise ValueError(f"act='relu' takes no threshold (got {threshold}); use act='fatrelu'")
        return nn.ReLU()
    if act == "fatrelu":
        return FATReLU(threshold)
    if act == "shifted_relu":
        return ShiftedReLU(shift)
    raise KeyError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")


def activation_params(module: nn.Module) -> tuple[str, float] | None:
    """``(name, param)`` of one of our activation modules, or None for anything else."""
    if isinstance(module, FATReLU):
        t = float(module.threshold)
        return ("relu", 0.0) if t == 0.0 else ("fatrelu", t)
    if isinstance(module, ShiftedReLU):
        return ("shifted_relu", float(module.shift))
    if isinstance(module, nn.ReLU):
        return ("relu", 0.0)
    return None


def parse_hidden_act(name: str, param: float | None = None) -> tuple[str, float] | None:
    """Read a config's activation: ``("fatrelu", t)``, ``("shifted_relu", b)``, ``("relu", 0)``.

    Accepts the legacy ``"fatrelu_<t>"`` string. Returns None for activations that are not ours.
    """
    if not isinstance(name, str):
        return None
    if name == "relu":
        return ("relu", 0.0)
    if name in ("fatrelu", "shifted_relu"):
        return (name, float(param or 0.0))
    for prefix in ("fatrelu_", "shifted_relu_"):
        if name.startswith(prefix):
            try:
                return (prefix[:-1], float(name[len(prefix):]))
            except ValueError:
                raise ValueError(
                    f"hidden_act {name!r} is not '{prefix}<number>' (e.g. '{prefix}0.01')"
                ) from None
    return None


def register_with_transformers() -> None:
    """Make ``ACT2FN["fatrelu"]``, ``["shifted_relu"]`` and legacy ``["fatrelu_<t>"]`` resolve.

    Model classes build ``act_fn = ACT2FN[config.hidden_act]`` with no access to
    ``hidden_act_param``: the module is built with threshold 0 and the checkpoint's persistent
    ``threshold`` buffer then restores the value. Legacy strings carry the value themselves.
    """
    from transformers import activations

    acts = activations.ACT2FN
    acts["fatrelu"] = FATReLU
    acts["shifted_relu"] = ShiftedReLU
    base = type(acts)
    if getattr(base, "_prosparse_legacy", False):
        return

    class _WithLegacyNames(base):
        # dict.__getitem__ calls __missing__ on the subclass for unknown keys: parse the legacy
        # "fatrelu_<t>" form there instead of listing every threshold.
        _prosparse_legacy = True

        def __missing__(self, key):
            parsed = parse_hidden_act(key)
            if parsed is None or parsed[0] == "relu":
                raise KeyError(key)
            name, value = parsed
            return (FATReLU, {"threshold": value}) if name == "fatrelu" else (
                ShiftedReLU, {"shift": value})

    acts.__class__ = _WithLegacyNames
