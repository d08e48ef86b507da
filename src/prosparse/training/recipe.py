"""The training recipe: dataclasses (one docstring line per field) and their validation; read
through the one config loader (:mod:`prosparse.core.config`).

A recipe file is YAML whose keys mirror :class:`Recipe`; the schedule's ``lambda`` key is the
field ``Stage.lam`` (``lambda`` is reserved in Python).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prosparse.core import checks
from prosparse.core.config import build, load_config, to_dict
from prosparse.core.errors import UnknownNameError, UsageError
from prosparse.kernels.activations import ACTS
from prosparse.sparsity.schedule import Stage, validate_stages

NORMALIZATIONS = ("mean", "sum_scaled")
TRAIN_PARAMS = ("all", "ffn")


@dataclass
class PenaltyConfig:
    """How ||x1||_1 is normalised; the lambdas of a recipe only mean something with it
    (``docs/conventions.md``, "The L1 term")."""

    normalization: str = "sum_scaled"
    """``sum_scaled``: sum |x1| over tokens and neurons * scale, summed over layers, / grad-accum
    count (the authors' framework); ``mean``: mean |x1| over elements, summed over layers."""
    scale: float = 1e-8
    """Multiplier of the ``sum_scaled`` sum (1e-8 in the authors' framework)."""


@dataclass
class DataConfig:
    """Training text: sources with mixture weights, packed into blocks of ``seq_len``."""

    sources: list[str] = field(default_factory=lambda: ["wiki"])
    """Data specs (``wiki``, ``qa``, ``NAME=PATH`` of .txt/.jsonl/folder)."""
    weights: list[float] | None = None
    """Mixture weight per source (fraction of training blocks); None = proportional to size."""
    seq_len: int = 4096
    """Tokens per packed block (the context length)."""
    heldout: list[str] = field(default_factory=lambda: ["wiki"])
    """Data specs whose held-out split gives perplexity and sparsity during training."""
    heldout_tokens: int = 8192
    """Held-out tokens per evaluation (per source)."""
    heldout_seq_len: int | None = None
    """Block length of held-out evaluation (perplexity depends on it); None = ``seq_len``."""
    cache: bool = True
    """Keep tokenised, packed blocks on disk (under the run folder's ``data/``)."""
    format: str = "text"
    """``text``, or ``chat`` for SFT: JSONL ``messages`` rendered with the model's chat
    template, LM loss on assistant tokens only (the L1 penalty and KD stay on every token)."""


@dataclass
class OptimConfig:
    """AdamW with a cosine learning rate after a linear warm-up."""

    lr: float = 3e-5
    """Peak learning rate (Table 6: 3e-5 for 7B, 5e-5 for 13B)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` at the last step of the schedule."""
    warmup_steps: int = 100
    """Linear warm-up steps of the learning rate (not of lambda)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    train_params: str = "all"
    """Which parameters train: ``all``, or ``ffn`` (gate/up/down projections only)."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name substrings kept frozen on top of ``train_params`` (e.g. ``[down_proj]``:
    the L1 term can then not be paid by shrinking x1 and growing down_proj to compensate)."""
    reinit_dead_every: int = 0
    """Dead-neuron gate re-initialisation (not in the paper; TwELL, 2026): every N steps, a
    neuron whose x1 was exactly zero on every training token since the last check gets its
    ``gate_proj`` row drawn again at its layer's row scale (and its AdamW moments cleared), so
    the L1 penalty cannot leave it dead for good; 0 = never."""
    fused: bool | None = None
    """AdamW's fused kernel (one pass per parameter instead of a dozen; equal within rounding):
    None = wherever torch has it for the parameters' device, false = the per-tensor loop."""


@dataclass
class DistillConfig:
    """Opt-in knowledge distillation from the frozen original (pre-swap) model (not in the paper)."""

    weight: float = 0.0
    """Weight of KL(teacher || student) on next-token distributions; 0 disables (no teacher)."""
    steps: int = 0
    """Distil for the first N steps only (the recovery after the swap, where it helps most;
    later steps skip the teacher's forward pass, a third of a step on a small model);
    0 = every step."""
    temperature: float = 1.0
    """Softmax temperature of both distributions; the KL is multiplied by T^2."""
    lm_weight: float = 1.0
    """Weight of the plain LM cross-entropy (1 in the paper; may be lowered when distilling)."""
    teacher: str | None = None
    """The teacher's model spec; None = the original the model records (the pre-swap model, or
    the one a ``prosparse train`` checkpoint started from). Needed for a ReLU-family model that
    records neither."""
    hidden_weight: float = 0.0
    """Weight of hidden-state matching against the teacher: the mean over decoder layers of
    ||h_student - h_teacher||^2 / ||h_teacher||^2 (each layer's output, the last one after the
    final norm). Needs ``weight`` > 0 (the teacher); 0 disables."""


@dataclass
class ThresholdConfig:
    """Activation threshold shifting at the end (paper Section 3.2, Appendix O)."""

    value: float | None = None
    """FATReLU threshold t of the final checkpoint; None = the sweep's recommendation."""
    sweep: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.03, 0.05])
    """Thresholds tried when ``value`` is None."""
    tolerance: float = 0.01
    """Sweep: largest t whose held-out perplexity is within this relative tolerance of the
    perplexity at the trained t (``train``; t = 0 when the model trained under plain ReLU)."""
    per_layer: bool = False
    """One FATReLU threshold per layer instead of one ``t``: each layer's the largest within a
    CETT budget shared by all layers, the budget searched for the largest perplexity within
    ``tolerance`` (``prosparse threshold --per-layer``); ``sweep`` and ``value`` are then unused."""
    reference: str = "trained"
    """What ``tolerance`` is relative to: ``trained``, the model's own perplexity at the trained
    threshold (``train``), or ``original``, the original model's before the swap: then the
    final threshold is the sparsest whose perplexity is within ``tolerance`` of the original
    (``tolerance: 0.15`` = at most 1.15x); none below ``train``, and ``train`` itself when the
    trained model is already past it (the report's ``within_tolerance`` is then false)."""
    train: float = 0.0
    """Threshold-aware training (not in the paper): the FATReLU threshold the model trains under
    at the end, reached by a linear ramp from the swapped-in activation's own threshold (0 for
    relu) over ``train_ramp`` steps after step ``train_start``, then held to the last step, so
    the weights adapt to the shift the final sweep applies. 0 disables."""
    train_start: int = 0
    """Last step before the ramp (the threshold starts rising at ``train_start + 1``)."""
    train_ramp: int = 0
    """Ramp length in steps; 0 = the full threshold from ``train_start + 1`` on."""


@dataclass
class LogConfig:
    """What is logged and how often."""

    eval_every: int = 500
    """Steps between held-out evaluations (sparsity per layer, perplexity); 0 = only at the end."""
    eval_tokens: int = 8192
    """Held-out tokens per source for the evaluations during training (<= data.heldout_tokens)."""
    measure_before: bool = True
    """Measure the original model and the bare swap before training (the report's first rows)."""
    tensorboard: bool = True
    """Also write TensorBoard events (when tensorboard is installed)."""


@dataclass
class EvalConfig:
    """A small lm-eval benchmark run in the report (original model and final model)."""

    tasks: list[str] = field(default_factory=list)
    """Task names for ``prosparse eval`` (e.g. piqa, hellaswag, boolq); empty = no benchmark."""
    limit: int = 50
    """First N documents of each task (keeps the report within a time budget)."""


@dataclass
class CheckpointConfig:
    """Checkpoints: HF model + optimizer + scheduler + step + data position + RNG, atomic."""

    every: int = 1000
    """Steps between checkpoints; 0 = only the final model."""
    keep: int = 2
    """Keep the last N checkpoints."""


@dataclass
class AnnealConfig:
    """Activation annealing after the swap: ``act = (1 - a) * act0 + a * relu`` (not in the
    paper), ``a`` a pure function of the step reaching exactly 1 at ``steps``."""

    steps: int = 0
    """Ramp length in steps; 0 = the bare swap at step 1 (the paper's recipe). Must end before
    lambda first rises above 0."""
    shape: str = "linear"
    """``linear`` (a = step / steps) or ``cosine`` (a = (1 - cos(pi step / steps)) / 2)."""


@dataclass
class WeightsConfig:
    """What training does with the weights themselves."""

    keep_mask: bool | None = None
    """Keep every zero weight of a pruned model (``prosparse prune``) exactly zero: true,
    false, or null = true when the model carries a mask (``prosparse_pruning`` in its config)."""


@dataclass
class Recipe:
    """A ProSparse training run: swap, progressive L1 (Algorithm 1), threshold shift."""

    model: str = "smollm2-135m"
    """Model spec for ``prosparse.load_model`` (embedded name, HF folder, .gguf)."""
    activation: str = "relu"
    """Activation swapped in before training: ``relu``, ``shifted_relu`` (baseline), ``fatrelu``,
    ``drelu`` (ReLU on the up projection too, TurboSparse)."""
    activation_param: float = 0.0
    """Shift b of ``shifted_relu`` or threshold of ``fatrelu`` during training."""
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    """Optional blend from the original activation into ``activation`` over the first steps."""
    stages: list[Stage] = field(default_factory=lambda: [Stage(steps=100, lam=0.0)])
    """Algorithm 1 stages: ``{lambda, steps (cumulative T_i), fixed, name}``."""
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    """Normalisation of the L1 term."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and learning-rate schedule."""
    batch_size: int = 1
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Optional distillation from the original model."""
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    """Final threshold shift."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    """Weight masks kept through training (ProxSparse/Wanda/SparseGPT-pruned models)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Small lm-eval benchmark of the original and final models in the report."""
    dtype: str = "auto"
    """Autocast: ``auto`` (bf16 on GPU and on CPUs with native bf16 matmuls, AVX512-BF16 or
    AMX; fp32 on other CPUs), ``bf16``, ``fp32``."""
    seed: int = 0
    """Seed of the data order and of torch."""
    time_budget: float = 0.0
    """Minutes the whole run may take, from the start of ``prosparse train`` to its report
    (loading, the measurements before, training, the threshold sweep, the lm-eval). The run
    times its first :data:`BUDGET_PROBE_STEPS` steps and, when the schedule as written would
    end later, trains fewer steps: every step count of the schedule (stages, distillation,
    annealing, threshold ramp) scaled by the same factor (:func:`scale_schedule`), said in the
    log and in the report's ``time_budget``. 0 = the schedule as written."""

    def validate(self) -> None:
        validate_stages(self.stages)
        for key, check in _FIELD_CHECKS.items():
            value = _get(self, key)
            if value is not None:
                checks.check_field(key, value, check)
        for key, check in _LIST_CHECKS.items():
            for i, value in enumerate(_get(self, key) or ()):
                checks.check_field(f"{key}.{i}", value, check)
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise UsageError(f"optim.betas ({self.optim.betas}) must be two numbers in [0, 1), "
                             "e.g. [0.9, 0.95]")
        if not self.data.sources:
            raise UsageError("data.sources is empty; name at least one source, e.g. [wiki]")
        if self.data.weights is not None and not sum(self.data.weights) > 0:
            raise UsageError(f"data.weights ({self.data.weights}) must have a positive sum")
        if self.activation == "fatrelu" and self.activation_param < 0:
            raise UsageError(f"activation_param ({self.activation_param}) is a fatrelu "
                             "threshold and must be >= 0")
        _choice("penalty.normalization", self.penalty.normalization, NORMALIZATIONS)
        _choice("optim.train_params", self.optim.train_params, TRAIN_PARAMS)
        _choice("data.format", self.data.format, ("text", "chat"))
        if self.eval.tasks and self.eval.limit <= 0:
            raise UsageError(f"eval.limit ({self.eval.limit}) must be a positive number of "
                             "documents per task")
        _choice("activation", self.activation, ACTS)
        if self.activation == "cats":
            # relufy_ would take activation_param as one threshold for every layer, and the
            # final FATReLU shift would replace the SiLU: neither is CATS.
            raise UsageError("activation: cats is training-free and calibrated per layer; "
                             "make it with `prosparse convert MODEL --act cats --target-sparsity S "
                             "--data SRC`. Training recipes swap in relu, fatrelu or "
                             "shifted_relu")
        _choice("anneal.shape", self.anneal.shape, ("linear", "cosine"))
        first_l1, prev = None, 0  # the last step before lambda first leaves 0
        for s in self.stages:
            if s.lam > 0:
                first_l1 = prev
                break
            prev = s.steps
        if first_l1 is not None and self.anneal.steps > first_l1:
            raise UsageError(f"anneal.steps ({self.anneal.steps}) must end before the L1 "
                             f"stages start (lambda > 0 from step {first_l1 + 1}); shorten the "
                             "ramp or lengthen stage 0")
        _choice("dtype", self.dtype, ("auto", "bf16", "fp32"))
        if self.data.weights is not None and len(self.data.weights) != len(self.data.sources):
            raise UsageError(
                f"data.weights has {len(self.data.weights)} entries for "
                f"{len(self.data.sources)} data.sources; give one weight per source or null"
            )
        th = self.threshold
        if self.activation == "drelu" and self.anneal.steps > 0:
            raise UsageError("anneal.steps blends the original activation into the gate only; "
                             "a drelu recipe rectifies the up projection too: set anneal.steps=0")
        if th.train > 0:
            if self.activation not in ("relu", "fatrelu", "drelu"):
                raise UsageError(f"threshold.train ({th.train}) trains under FATReLU; it needs "
                                 f"activation relu or fatrelu (got {self.activation!r})")
            base = self.activation_param if self.activation in ("fatrelu", "drelu") else 0.0
            if th.train < base:
                raise UsageError(f"threshold.train ({th.train}) is below activation_param "
                                 f"({base}); the ramp only raises the threshold")
            if th.train_start + th.train_ramp > self.total_steps:
                raise UsageError(f"threshold.train_start + threshold.train_ramp "
                                 f"({th.train_start} + {th.train_ramp}) runs past the last step "
                                 f"({self.total_steps}); start the ramp earlier or shorten it")
            if th.train_start < self.anneal.steps:
                raise UsageError(f"threshold.train_start ({th.train_start}) falls inside the "
                                 f"activation annealing ramp (anneal.steps {self.anneal.steps}); "
                                 "start the threshold ramp after it")
        if th.reference not in ("trained", "original"):
            raise UsageError(f"threshold.reference {th.reference!r}: choose trained (the model's "
                             "own perplexity at the trained threshold) or original")
        if th.value is None and not th.sweep and not th.per_layer:
            raise UsageError("threshold.sweep is empty and threshold.value is null: give the "
                             "thresholds to try (e.g. threshold.sweep=[0.01,0.02]) or a fixed "
                             "threshold.value")
        if self.seed >= 2**32:
            raise UsageError(f"seed ({self.seed}) must be below 2**32 (numpy's limit)")
        if self.distill.hidden_weight > 0 and self.distill.weight == 0:
            raise UsageError("distill.hidden_weight > 0 matches the original model's hidden "
                             "states, which needs its teacher: set distill.weight > 0 too")
        if self.distill.steps and self.distill.lm_weight == 0:
            raise UsageError(f"distill.steps ({self.distill.steps}) ends distillation early but "
                             "distill.lm_weight is 0: the steps after it would train on nothing; "
                             "set distill.lm_weight > 0 or distill.steps=0")
        if self.distill.weight == 0 and self.distill.lm_weight == 0:
            raise UsageError("distill.lm_weight is 0 and distill.weight is 0: nothing to train on; "
                             "set one of them > 0")

    @property
    def total_steps(self) -> int:
        return self.stages[-1].steps


def _seq_len(value) -> int:
    value = checks.positive_int(value)
    if value < 2:
        raise checks.argparse.ArgumentTypeError(f"{value} is too short a block; use >= 2 tokens")
    return value


# Range of every number in a recipe (types are checked while it is built).
_FIELD_CHECKS = {
    "activation_param": checks.act_scalar,
    "penalty.scale": checks.positive_float,
    "data.seq_len": _seq_len,
    "data.heldout_tokens": checks.positive_int,
    "data.heldout_seq_len": _seq_len,
    "optim.lr": checks.positive_float,
    "anneal.steps": checks.nonneg_int,
    "optim.min_lr_ratio": checks.fraction,
    "optim.warmup_steps": checks.nonneg_int,
    "optim.weight_decay": checks.nonneg_float,
    "optim.grad_clip": checks.nonneg_float,
    "optim.reinit_dead_every": checks.nonneg_int,
    "batch_size": checks.positive_int,
    "grad_accum": checks.positive_int,
    "distill.weight": checks.nonneg_float,
    "distill.temperature": checks.positive_float,
    "distill.steps": checks.nonneg_int,
    "distill.lm_weight": checks.nonneg_float,
    "distill.hidden_weight": checks.nonneg_float,
    "threshold.value": checks.threshold,
    "threshold.tolerance": checks.nonneg_float,
    "threshold.train": checks.threshold,
    "threshold.train_start": checks.nonneg_int,
    "threshold.train_ramp": checks.nonneg_int,
    "log.eval_every": checks.nonneg_int,
    "log.eval_tokens": checks.positive_int,
    "checkpoint.every": checks.nonneg_int,
    "checkpoint.keep": checks.positive_int,
    "seed": checks.nonneg_int,
    "time_budget": checks.nonneg_float,
}
_LIST_CHECKS = {
    "data.weights": checks.nonneg_float,
    "threshold.sweep": checks.threshold,
}


BUDGET_PROBE_STEPS = 10
"""Steps a ``time_budget`` run times before it fixes its schedule (the first one, which warms
kernels and caches up, is not counted)."""


def scale_schedule(recipe: Recipe, steps: int) -> Recipe:
    """The recipe with its schedule compressed to ``steps`` optimiser steps (fewer than it has):
    every stage boundary, ``distill.steps``, ``anneal.steps`` and the threshold ramp's start and
    length multiplied by ``steps / total_steps`` and rounded, stage boundaries kept strictly
    increasing, the ramp kept inside the run. Lambdas, learning rate, warm-up and logging are
    unchanged. The result is validated."""
    import copy

    total = recipe.total_steps
    if not 0 < steps < total:
        raise ValueError(f"scale_schedule: steps ({steps}) must be in 1..{total - 1}")
    if steps < len(recipe.stages):
        raise UsageError(f"time_budget leaves {steps} steps, fewer than the recipe's "
                         f"{len(recipe.stages)} stages; raise time_budget or shorten the recipe")
    f = steps / total
    out = copy.deepcopy(recipe)
    prev = 0
    n = len(out.stages)
    for i, st in enumerate(out.stages):  # leave one step for each stage still to come
        st.steps = steps if i == n - 1 else min(max(prev + 1, round(st.steps * f)),
                                                steps - (n - 1 - i))
        prev = st.steps
    if out.distill.steps:
        out.distill.steps = max(1, round(out.distill.steps * f))
    out.anneal.steps = round(out.anneal.steps * f)
    th = out.threshold
    if th.train > 0:
        th.train_ramp = min(round(th.train_ramp * f), steps)
        th.train_start = max(out.anneal.steps, min(round(th.train_start * f),
                                                   steps - th.train_ramp))
    out.validate()
    return out


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UnknownNameError(f"unknown {key} {value!r}; choose one of {', '.join(valid)}")


def recipe_from_dict(data: dict) -> Recipe:
    """Build and validate a :class:`Recipe` from YAML data."""
    recipe = build(Recipe, data or {})
    recipe.validate()
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    return load_config(Recipe, path, overrides, what="recipe")


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a recipe, every setting written out (the run's saved config)."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
