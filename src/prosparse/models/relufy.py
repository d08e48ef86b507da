"""Find the gated FFNs of any transformers model by structure, and swap their activation in place.

A gated FFN (paper Section 3.1; ``docs/conventions.md``) is a module with a down projection ``down_proj`` fed by either separate
``gate_proj`` and ``up_proj`` linears or one fused ``gate_up_proj`` (Phi-3), and a parameter-free
activation child (``act_fn`` in Llama/Mistral/Qwen/Gemma/OLMo2/Granite/SmolLM3, ``activation_fn``
in Phi-3). Nothing here lists model classes: a new family with the Hugging Face module names
works unchanged, and the state dict keeps its keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.kernels.activations import ACTS, check_act
from prosparse.models.activations import (
    RectifiedLinear,
    ffn_activation,
    make_activation,
)

_SEPARATE = ("gate_proj", "up_proj")
_FUSED = "gate_up_proj"
_LOOKED_FOR = (
    "modules with a 'down_proj' linear fed by 'gate_proj' and 'up_proj' linears (or one fused "
    "'gate_up_proj') through a parameter-free activation child such as 'act_fn'"
)


@dataclass
class GatedFFN:
    """One gated FFN found in a model."""

    name: str
    """Qualified module name, e.g. ``model.layers.3.mlp``."""
    module: nn.Module
    """The FFN module itself."""
    act_attr: str
    """Attribute holding the activation (``act_fn`` or ``activation_fn``)."""
    fused: bool
    """True when gate and up live in one ``gate_up_proj`` (Phi-3)."""

    @property
    def act(self) -> nn.Module:
        return getattr(self.module, self.act_attr)

    @property
    def down_proj(self) -> nn.Linear:
        return self.module.down_proj

    @property
    def gate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gate projection's weight (d_ff, d_model) and bias (or None); for a fused
        ``gate_up_proj`` its first d_ff rows, the half Phi-3 feeds the activation."""
        lin = getattr(self.module, _FUSED) if self.fused else self.module.gate_proj
        if not self.fused:
            return lin.weight, lin.bias
        d_ff = self.down_proj.in_features
        return lin.weight[:d_ff], None if lin.bias is None else lin.bias[:d_ff]


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "weight") and m.weight.dim() == 2


def _activation_child(module: nn.Module) -> str | None:
    for name, child in module.named_children():
        if name in ("down_proj", "up_proj", "gate_proj", _FUSED):
            continue
        if next(child.parameters(), None) is None:
            return name
    return None


def find_gated_ffns(model: nn.Module) -> list[GatedFFN]:
    """Every gated FFN of ``model``, in module order (layer order for decoder stacks).

    Raises :class:`UsageError` naming the model class and what was looked for when there is none.
    """
    found = []
    for name, module in model.named_modules():
        down = getattr(module, "down_proj", None)
        if not _is_linear(down):
            continue
        fused = _is_linear(getattr(module, _FUSED, None))
        separate = all(_is_linear(getattr(module, a, None)) for a in _SEPARATE)
        if not (fused or separate):
            continue
        act_attr = _activation_child(module)
        if act_attr is None:
            continue
        found.append(GatedFFN(name, module, act_attr, fused and not separate))
    if not found:
        raise UsageError(
            f"{type(model).__name__} has no gated FFN: looked for {_LOOKED_FOR}. "
            "ProSparse applies to gated (SwiGLU/GeGLU) FFNs; models such as GPT-2 or BERT have none."
        )
    return found


def relufy_(
    model: nn.Module,
    act: str = "relu",
    param: float | Sequence[float] = 0.0,
    *,
    filter: Callable[[GatedFFN], bool] | None = None,
    threshold: float | None = None,
    shift: float | None = None,
) -> list[str]:
    """Replace the activation of every gated FFN in ``model`` (in place) and update its config.

    ``act`` is ``relu``, ``fatrelu`` (keeps ``g >= param``), ``shifted_relu``
    (``relu(g - param)``) or ``cats`` (keeps ``silu(g)`` where ``|silu(g)| >= param``);
    ``param`` is the activation's one scalar, or one per FFN in layer order (CATS calibrates a
    threshold per layer). ``threshold=`` (FATReLU) and ``shift=`` (shifted ReLU) are spellings
    of ``param`` for readability. A zero FATReLU threshold or shift gives a plain ``nn.ReLU``,
    saved as ``hidden_act: "relu"`` so plain transformers loads it. ``filter`` keeps only some
    FFNs. Returns the names of the FFNs changed.
    """
    check_act(act)
    for name, alias, owner in (("threshold", threshold, "fatrelu"), ("shift", shift, "shifted_relu")):
        if alias is None:
            continue
        if act != owner:
            raise ValueError(f"{name}={alias} applies to act={owner!r} only (got act={act!r}); "
                             f"pass param= instead")
        param = alias
    ffns = [f for f in find_gated_ffns(model) if filter is None or filter(f)]
    params = [float(p) for p in param] if isinstance(param, (list, tuple)) else None
    if params is not None and len(params) != len(ffns):
        raise ValueError(f"{len(params)} parameters for {len(ffns)} gated FFNs; give one per FFN "
                         "or a single number")
    values = params if params is not None else [float(param)] * len(ffns)
    for p in values:
        if not math.isfinite(p):
            raise ValueError(f"the {act} parameter must be a finite number, got {p}")
        if act == "relu" and p:
            raise ValueError(f"act='relu' takes no parameter (got {p}); use act='fatrelu' for a "
                             "threshold or act='shifted_relu' for a shift")
        if act in ("fatrelu", "cats") and p < 0:
            raise ValueError(f"threshold ({p}) must be >= 0 for {act}")
    if act in ("fatrelu", "shifted_relu") and not any(values):
        act = "relu"
    if filter is None and hasattr(model, "config"):
        record_original_activation(model)
    if act == "drelu" and any(f.fused for f in ffns):
        raise ValueError("act='drelu' puts a ReLU on the up projection, which a fused "
                         "gate_up_proj (Phi-3) does not have apart; use relu or fatrelu")
    changed = []
    for ffn, p in zip(ffns, values):
        old = ffn.act
        new = make_activation(act, p if act != "relu" else 0.0)
        buf = next(old.buffers(), None) if old is not None else None
        device = buf.device if buf is not None else ffn.down_proj.weight.device
        setattr(ffn.module, ffn.act_attr, new.to(device))
        up = getattr(ffn.module, "up_proj", None)
        if up is not None and type(up) in (nn.Linear, RectifiedLinear):  # dReLU: up rectified
            up.__class__ = RectifiedLinear if act == "drelu" else nn.Linear
        changed.append(ffn.name)
    if filter is None and hasattr(model, "config"):
        same = len(set(values)) <= 1
        set_activation_config(model.config, act, values[0] if same and values else values)
    return changed


ORIGINAL_ACT_KEY = "prosparse_original_act"
"""Config key: the activation the model had before its first swap (``silu``), so a converted
checkpoint's original can be rebuilt (its weights are the original's) for distillation and for
the "original" row of a training report."""
TRAINED_FROM_KEY = "prosparse_trained_from"
"""Config key of a checkpoint ``prosparse train`` wrote: the original model its training
started from (a model spec), the teacher of any later recipe run on it."""


def config_activation(config) -> str | None:
    """The activation name a transformers config gives (``hidden_act`` or ``hidden_activation``,
    of the text config too)."""
    for cfg in (config, getattr(config, "text_config", None)):
        for key in ("hidden_act", "hidden_activation"):
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, str):
                return value
    return None


def record_original_activation(model: nn.Module) -> None:
    """Before a first swap away from the model's own activation (SiLU, GELU), note it in the
    config under :data:`ORIGINAL_ACT_KEY`; a later swap keeps the first record."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, ORIGINAL_ACT_KEY, None):
        return
    if current_activation(model)[0].startswith("other:"):
        original = config_activation(config)
        if original is not None:
            setattr(config, ORIGINAL_ACT_KEY, original)


def restore_original_activation_(model: nn.Module) -> str | None:
    """Put back the activation recorded under :data:`ORIGINAL_ACT_KEY` on every gated FFN
    (and in the config); returns its name, or None when nothing is recorded."""
    from transformers.activations import ACT2FN

    config = getattr(model, "config", None)
    original = getattr(config, ORIGINAL_ACT_KEY, None) if config is not None else None
    if not original:
        return None
    for ffn in find_gated_ffns(model):
        device = ffn.down_proj.weight.device
        setattr(ffn.module, ffn.act_attr, ACT2FN[original].to(device))
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in ("hidden_act", "hidden_activation"):
            if isinstance(getattr(cfg, key, None), str):
                setattr(cfg, key, original)
        if hasattr(cfg, "hidden_act_param"):
            delattr(cfg, "hidden_act_param")
    return original


def set_threshold_(model: nn.Module, t: float | list[float]) -> list[str]:
    """Put FATReLU threshold ``t`` (one, or one per FFN) on the gate of every gated FFN,
    keeping the model's ReLU family: a dReLU model stays dReLU (``relu(u)`` on the up side).
    What threshold shifting, threshold-aware training and the sweep call."""
    act = current_activation(model)[0]
    return relufy_(model, "drelu" if act == "drelu" else "fatrelu", t)


def set_activation_config(config, act: str, param: float) -> None:
    """Write the activation into a (possibly nested) transformers config.

    ``hidden_act`` (and Gemma's ``hidden_activation``) becomes ``act``; ``hidden_act_param``
    holds the threshold or shift and is dropped for plain ReLU so the config stays vanilla.
    """
    configs = [config]
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        configs.append(text)
    for cfg in configs:
        touched = False
        for key in ("hidden_act", "hidden_activation"):
            if hasattr(cfg, key) and getattr(cfg, key) is not None:
                setattr(cfg, key, act)
                touched = True
        if not touched and cfg is config:
            cfg.hidden_act = act
        if act == "relu":
            if hasattr(cfg, "hidden_act_param"):
                delattr(cfg, "hidden_act_param")
        else:  # one number, or one per layer (CATS)
            cfg.hidden_act_param = ([float(p) for p in param] if isinstance(param, (list, tuple))
                                    else float(param))


def current_activation(model: nn.Module) -> tuple[str, float | list[float]]:
    """``(name, param)`` shared by all gated FFNs; ``("other:<Class>", 0.0)`` for SiLU/GELU;
    ``(name, [param per layer])`` when they share the activation but not its parameter (CATS);
    ``("mixed", 0.0)`` otherwise."""
    kinds = []
    for ffn in find_gated_ffns(model):
        p = ffn_activation(ffn.module, ffn.act_attr)
        kinds.append(p if p is not None else (f"other:{type(ffn.act).__name__}", 0.0))
    if len(set(kinds)) == 1:
        return kinds[0]
    if len({k[0] for k in kinds}) == 1 and kinds[0][0] in ACTS:
        return (kinds[0][0], [k[1] for k in kinds])
    return ("mixed", 0.0)


_ACT_KEYS = ("hidden_act", "hidden_activation", "hidden_act_param")


def activation_state(model: nn.Module) -> Callable[[], None]:
    """Snapshot every gated FFN's activation module and the config's activation keys; the
    returned function puts them back (used to try thresholds and restore SiLU afterwards)."""
    modules = [(f.module, f.act_attr, f.act, type(getattr(f.module, "up_proj", None)))
               for f in find_gated_ffns(model)]
    configs = [c for c in (getattr(model, "config", None),
                           getattr(getattr(model, "config", None), "text_config", None))
               if c is not None]
    saved = [(c, {k: getattr(c, k) for k in _ACT_KEYS if hasattr(c, k)}) for c in configs]

    def restore() -> None:
        for module, attr, act, up_class in modules:
            setattr(module, attr, act)
            if up_class in (nn.Linear, RectifiedLinear):  # a dReLU model's up ReLU too
                module.up_proj.__class__ = up_class
        for cfg, values in saved:
            for k in _ACT_KEYS:
                if k in values:
                    setattr(cfg, k, values[k])
                elif hasattr(cfg, k):
                    delattr(cfg, k)

    return restore
