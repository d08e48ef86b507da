"""ReLU-family activation modules for ReLUfied gated FFNs, and their registration with
transformers. The math and the names live on the ground floor, :mod:`prosparse.kernels.activations`.

FATReLU keeps ``g >= t`` (paper Eq. (3); the released Hugging Face code does the same). Every
kernel in :mod:`prosparse.kernels` agrees with :func:`fatrelu` exactly, boundary included.

A ReLUfied checkpoint names its activation in the config: ``hidden_act: "relu"`` for a plain ReLU
(plain transformers loads it unchanged), ``hidden_act: "fatrelu"`` with ``hidden_act_param: t``
otherwise, or the legacy string ``"fatrelu_<t>"``. The threshold is also a buffer in the state
dict (``...mlp.act_fn.threshold``), so transformers restores it exactly once ``prosparse`` is
imported, even without our loader.
"""

from __future__ import annotations

import torch
from torch import nn

from prosparse.kernels.activations import ACTS, cats, check_act, fatrelu, shifted_relu

__all__ = ["ACTS", "CATS", "FATReLU", "RectifiedLinear", "ShiftedReLU", "activation_params",
           "fatrelu", "ffn_activation", "make_activation",
           "parse_hidden_act", "register_with_transformers", "shifted_relu", "shortest_float"]


class _ScalarActivation(nn.Module):
    """An activation with one scalar (threshold or shift), kept two ways.

    ``value`` is a Python float: it survives transformers' meta-device construction, which
    leaves buffers missing from a checkpoint uninitialised. The persistent buffer carries the
    scalar inside checkpoints, for configs that name the activation without it
    (``hidden_act: "fatrelu"``): built with ``None``, the module reads the loaded buffer.
    A state-dict hook writes ``value`` into the buffer, so every save path stores it.
    """

    buffer_name = "param"

    def __init__(self, value: float | None = 0.0):
        super().__init__()
        self.value = None if value is None else float(value)
        self.register_buffer(self.buffer_name, torch.tensor(self.value or 0.0), persistent=True)
        self._register_state_dict_hook(_write_value_into_state_dict)

    def scalar(self, dtype: torch.dtype) -> float | torch.Tensor:
        """The scalar for inputs of ``dtype`` (a Python float is cast to ``dtype`` by torch)."""
        if self.value is None:
            return getattr(self, self.buffer_name).to(dtype)
        return self.value

    @property
    def param(self) -> float:
        """The scalar as the shortest decimal that its buffer dtype round-trips."""
        if self.value is not None:
            return self.value
        return shortest_float(getattr(self, self.buffer_name))

    def extra_repr(self) -> str:
        return f"{self.buffer_name}={self.param:g}"


def _write_value_into_state_dict(module, state_dict, prefix, _local_metadata):
    key = prefix + module.buffer_name
    if module.value is not None and key in state_dict:
        state_dict[key] = torch.full_like(state_dict[key], module.value)


class FATReLU(_ScalarActivation):
    """``act(g) = g if g >= threshold else 0`` (paper Eq. (3)); buffer ``threshold``."""

    buffer_name = "threshold"

    def __init__(self, threshold: float | None = 0.0):
        if threshold is not None and threshold < 0:
            raise ValueError(f"FATReLU threshold ({threshold}) must be >= 0")
        super().__init__(threshold)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return fatrelu(g, self.scalar(g.dtype))


class ShiftedReLU(_ScalarActivation):
    """``act(g) = relu(g - shift)``; buffer ``shift``."""

    buffer_name = "shift"

    def __init__(self, shift: float | None = 0.0):
        super().__init__(shift)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return shifted_relu(g, self.scalar(g.dtype))


class CATS(_ScalarActivation):
    """``silu(g)`` where ``|silu(g)| >= threshold``, exact zero elsewhere (CATS, Lee et al. 2024:
    training-free sparsity on the original SiLU model); buffer ``threshold``."""

    buffer_name = "threshold"

    def __init__(self, threshold: float | None = 0.0):
        if threshold is not None and threshold < 0:
            raise ValueError(f"CATS threshold ({threshold}) must be >= 0")
        super().__init__(threshold)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return cats(g, self.scalar(g.dtype))


class RectifiedLinear(nn.Linear):
    """``relu(x W^T + b)``: dReLU's up projection (TurboSparse). It stays an ``nn.Linear`` with
    the same parameters and state-dict keys, so only the class marks the ReLU; ``relufy_``
    sets and clears it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def make_activation(act: str, param: float = 0.0) -> nn.Module:
    """Build the activation module named ``act`` (one of :data:`ACTS`) with its one scalar:
    FATReLU's threshold or shifted ReLU's shift (for ``drelu``, the gate's module: a FATReLU,
    or ReLU at threshold 0; the up side is :class:`RectifiedLinear`)."""
    check_act(act)
    if act == "relu" or (act == "drelu" and not param):
        if param:
            raise ValueError(f"act='relu' takes no parameter (got {param}); use act='fatrelu'")
        return nn.ReLU()
    if act in ("fatrelu", "drelu"):
        return FATReLU(param)
    if act == "cats":
        return CATS(param)
    return ShiftedReLU(param)


def shortest_float(value: torch.Tensor) -> float:
    """The shortest decimal that rounds to ``value`` in its own dtype (fp32 0.0099999998 -> 0.01),
    so configs say ``hidden_act_param: 0.01`` rather than the buffer's binary approximation."""
    x = value.item()
    for digits in range(1, 18):
        y = float(f"{x:.{digits}g}")
        if torch.tensor(y, dtype=value.dtype).item() == x:
            return y
    return x


def activation_params(module: nn.Module) -> tuple[str, float] | None:
    """``(name, param)`` of one of our activation modules, or None for anything else."""
    if isinstance(module, FATReLU):
        return ("relu", 0.0) if module.param == 0.0 else ("fatrelu", module.param)
    if isinstance(module, ShiftedReLU):
        return ("shifted_relu", module.param)
    if isinstance(module, CATS):
        return ("cats", module.param)
    if isinstance(module, nn.ReLU):
        return ("relu", 0.0)
    return None


def ffn_activation(ffn: nn.Module, act_attr: str = "act_fn") -> tuple[str, float] | None:
    """``(name, param)`` of a gated FFN module: its activation module's, or ``("drelu", t)``
    when its up projection is a :class:`RectifiedLinear` (t the gate's FATReLU threshold)."""
    params = activation_params(getattr(ffn, act_attr))
    if params is not None and isinstance(getattr(ffn, "up_proj", None), RectifiedLinear):
        if params[0] in ("relu", "fatrelu"):
            return ("drelu", params[1])
    return params


def parse_hidden_act(name: str, param: float | None = None) -> tuple[str, float] | None:
    """Read a config's activation: ``("fatrelu", t)``, ``("shifted_relu", b)``, ``("relu", 0)``.

    Accepts the legacy ``"fatrelu_<t>"`` string. Returns None for activations that are not ours.
    """
    if not isinstance(name, str):
        return None
    if name == "relu":
        return ("relu", 0.0)
    if name in ("fatrelu", "shifted_relu", "cats", "drelu"):  # one number, or one per layer
        if isinstance(param, (list, tuple)):
            return (name, [float(p) for p in param])
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
    ``hidden_act_param``: the module is built without a value and reads the checkpoint's
    persistent ``threshold`` buffer. Legacy strings carry the value themselves.
    """
    from transformers import activations

    acts = activations.ACT2FN
    acts["fatrelu"] = (FATReLU, {"threshold": None})
    acts["shifted_relu"] = (ShiftedReLU, {"shift": None})
    acts["cats"] = (CATS, {"threshold": None})
    # dReLU's gate is a FATReLU; prosparse.load_model makes its up projection rectified too.
    acts["drelu"] = (FATReLU, {"threshold": None})
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
