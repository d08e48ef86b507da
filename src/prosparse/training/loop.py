"""The ProSparse training loop on Accelerate (paper Section 3.2): ReLU swap, progressive L1
(Algorithm 1), optional distillation, then activation threshold shifting.

Runs unchanged under ``accelerate launch`` (DDP, FSDP, DeepSpeed): the model and optimizer go
through ``accelerator.prepare``, gradients accumulate under ``accelerator.accumulate``, metrics
are reduced across processes, checkpoints use ``accelerator.save_state``. The learning rate and
lambda are pure functions of the step, so a resumed run lands on the same values.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.core.io import reserve
from prosparse.measure.heldout import evaluate_heldout
from prosparse.measure.hooks import capture_x1
from prosparse.models.anneal import anneal_factor, begin_anneal_, set_anneal_
from prosparse.models.relufy import (
    ORIGINAL_ACT_KEY,
    TRAINED_FROM_KEY,
    config_activation,
    current_activation,
    find_gated_ffns,
    restore_original_activation_,
)
from prosparse.sparsity.penalty import PenaltyCollector
from prosparse.sparsity.schedule import l1_factor, stage_index, train_threshold
from prosparse.training.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from prosparse.training.data import build_blocks, heldout_blocks, micro_batch
from prosparse.training.metrics import MetricsLog
from prosparse.training.recipe import BUDGET_PROBE_STEPS, Recipe, scale_schedule
from prosparse.training.report import benchmark, finish_run
from prosparse.training.runs import (
    check_recipe_inputs,
    check_resume_overwrite,
    check_run_folder,
    record_budget,
    recorded_budget,
    start_run_folder,
)

log = logging.getLogger(__name__)


def lr_at(step: int, recipe: Recipe) -> float:
    """Cosine learning rate after a linear warm-up, a pure function of the 1-based step."""
    o = recipe.optim
    total = recipe.total_steps
    if o.warmup_steps and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    span = max(total - o.warmup_steps, 1)
    progress = min(max(step - o.warmup_steps, 0) / span, 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, mean over tokens, times T^2."""
    v = logits.shape[-1]
    s = F.log_softmax(logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_loss(hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]
                ) -> torch.Tensor:
    """Mean over decoder layers of ||h - h_t||^2 / ||h_t||^2 (relative squared error of each
    layer's output; index 0, the embeddings, is left out)."""
    terms = [(h.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp(min=1e-12)
             for h, t in zip(hidden[1:], teacher_hidden[1:], strict=True)]
    return torch.stack(terms).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Token-mean next-token cross-entropy; with ``mask`` (batch, seq) only over the target
    tokens it marks (SFT: answers only), zero when it marks none.

    The last position has no target (ignore_index) instead of being sliced off: slicing the
    (batch, seq, vocab) logits would copy them, the largest tensor of a small model's step."""
    v = logits.shape[-1]
    target = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
    if mask is None:
        return F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1))
    nll = F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1),
                          reduction="none")  # (batch * seq,), 0 at the ignored last positions
    keep = torch.cat([mask[:, 1:], mask.new_zeros((mask.shape[0], 1))], dim=1)
    keep = keep.reshape(-1).to(nll.dtype)
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def bf16_teacher_linears_(teacher: torch.nn.Module) -> int:
    """Cast a frozen teacher's ``nn.Linear`` weights (and biases) to bf16 once, for its forward
    under bf16 autocast: autocast would cast the same fp32 weights to bf16 at every step (a
    no-grad weight is not cached), with the same rounding, so the logits are bit-identical.
    Norms and embeddings stay fp32, as autocast keeps them; a head tied to the embedding gets
    its own bf16 copy. Returns the number of linears cast."""
    n = 0
    for m in teacher.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32:
            m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16),
                                          requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(m.bias.detach().to(torch.bfloat16),
                                            requires_grad=False)
            n += 1
    return n


@dataclass
class TrainResult:
    """What a finished (or stopped) run returns; ``report`` is what report.json holds."""

    run: Path
    """Run folder."""
    step: int
    """Last optimiser step done."""
    report: dict = field(default_factory=dict)
    """Before/after measurements, threshold, tokens, wall time (empty when stopped early)."""
    lambdas: list[float] = field(default_factory=list)
    """lambda this process used at each step it ran (every rank must agree)."""


def use_fused_adamw(params: list[torch.Tensor], fused: bool | None) -> bool | None:
    """``optim.fused``: None picks the fused kernel where torch has one for every parameter
    (floating point, on CPU or CUDA); True where it has none is a clear error."""
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                              for p in params)
    if fused is None:
        return True if ok else None
    if fused and not ok:
        kinds = sorted({f"{p.device.type}/{p.dtype}" for p in params})
        raise UsageError(f"optim.fused is true but torch's fused AdamW does not take parameters "
                         f"on {', '.join(kinds)}; set optim.fused to null or false")
    return fused or None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, many times slower than fp32."""
    from prosparse.kernels.fused import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


BF16_MIN_SPEEDUP = 1.1
"""``dtype: auto`` trains under bf16 autocast on a CPU only where a bf16 matrix product runs at
least this much faster than fp32 (measured by :func:`bf16_matmul_speedup`)."""


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup(reps: int = 8) -> float:
    """fp32 time over bf16 time of one FFN-sized product (256 tokens x 1024 -> 2816, the weight
    cast to bf16 each time as autocast does), medians of ``reps`` after a warm-up: about 0.2 s.

    Hardware bf16 is not always faster: with AMX it is (1.6x a training step), but a VM that
    reports AVX512-BF16 without AMX can run bf16 products slower than fp32 (1.6x slower a step
    of ``make demo`` on one such Xeon), so the flags alone do not decide."""
    x = torch.randn(256, 1024)
    w = torch.randn(2816, 1024)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    fp32 = median_time(lambda: x @ w.T)
    xb = x.bfloat16()
    bf16 = median_time(lambda: xb @ w.bfloat16().T)
    return fp32 / max(bf16, 1e-9)


def _cpu_bf16_pays() -> bool:
    """bf16 autocast on this CPU: native bf16 that measures faster than fp32. Processes of one
    run must agree, so a multi-process run goes by the flags (AMX) instead of a timing."""
    from prosparse.kernels.fused import cpu_flags

    if not cpu_has_native_bf16():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "amx_bf16" in cpu_flags()
    return bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def _mixed_precision(recipe: Recipe) -> str:
    """``dtype: auto`` is bf16 autocast on CUDA and on CPUs whose native bf16 products measure
    faster than fp32 (the make demo recipe with AMX: 1.6x the steps per second at the same
    frontier, benchmarks/results/frontier/prosparse-1.5-bf16.json), fp32 elsewhere."""
    if recipe.dtype == "bf16":
        return "bf16"
    if recipe.dtype == "auto" and (torch.cuda.is_available() or _cpu_bf16_pays()):
        return "bf16"
    return "no"


def train(recipe: Recipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, accelerator=None, overwrite: bool = False) -> TrainResult:
    """Run ``recipe`` into the run folder ``out``.

    ``resume`` continues from the latest checkpoint in ``out`` (refused when the model, the
    number of processes or the recipe changed, beyond
    :data:`~prosparse.training.runs.RESUME_MAY_CHANGE`); ``overwrite`` replaces a run already in
    ``out`` (without it, that is refused); ``stop_after`` stops after that many optimiser steps
    (an interruption, for tests) without the final threshold shift. The run folder is reserved
    for the whole run: a second ``train`` into it is refused.
    """
    from accelerate import Accelerator

    wall_start = time.time()
    recipe.validate()
    if recipe.activation == "shifted_relu" and recipe.activation_param and recipe.threshold.value:
        raise UsageError(
            f"threshold.value ({recipe.threshold.value:g}) would put a FATReLU threshold on a "
            f"shifted ReLU (shift {recipe.activation_param:g}), an activation prosparse does not "
            "have; set threshold.value to 0 or null (the final model keeps relu(g - shift))")
    run = Path(out)
    check_resume_overwrite(resume, overwrite)  # before the Accelerator: a usage error, no work
    check_recipe_inputs(recipe)
    if accelerator is None:
        accelerator = Accelerator(gradient_accumulation_steps=recipe.grad_accum,
                                  mixed_precision=_mixed_precision(recipe))
    refused = None
    try:
        ckpt, fingerprint = check_run_folder(run, recipe, resume=resume, overwrite=overwrite,
                                             world_size=accelerator.num_processes)
    except UsageError as e:
        refused = e
    # A collective, so every rank has checked before the main one reserves the folder below.
    if _on_any_rank(accelerator, refused is not None):
        raise refused or UsageError(f"{run}: another process of this launch refused the run "
                                    "folder; see its message")
    with ExitStack() as stack:
        busy = None
        if accelerator.is_main_process:
            try:
                run.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(reserve(run))
            except UsageError as e:
                busy = e
        if _on_any_rank(accelerator, busy is not None):  # every rank stops, none waits forever
            raise busy or UsageError(f"{run} is being written by another prosparse process; "
                                     "wait for it to finish or choose another --out")
        fresh = not resume and not (run.is_dir() and any(run.iterdir()))
        if accelerator.is_main_process:
            step = 0 if ckpt is None else checkpoint_step(ckpt)
            start_run_folder(run, recipe, fingerprint, resume=resume, overwrite=overwrite,
                             step=step)
        accelerator.wait_for_everyone()
        try:
            return _train(recipe, run, ckpt, accelerator, stop_after, progress, wall_start)
        except UsageError:
            # Refused before step 1 (a check that needs the model, the data or the tokenizer):
            # a folder this run created holds nothing worth keeping, so the corrected command
            # just works.
            if fresh and accelerator.is_main_process and not _any_step_logged(run):
                import shutil

                shutil.rmtree(run, ignore_errors=True)
            raise


def _any_step_logged(run: Path) -> bool:
    from prosparse.training.metrics import METRICS_FILE

    path = run / METRICS_FILE
    return path.is_file() and path.stat().st_size > 0


def _on_any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


@dataclass
class _Session:
    """Everything the step loop needs, built once by :func:`_setup`."""

    recipe: Recipe
    run: Path
    accelerator: object
    model: torch.nn.Module
    tok: object
    opt: torch.optim.Optimizer
    teacher: torch.nn.Module | None
    blocks: torch.Tensor
    """Training blocks (n, seq_len); micro-batch k of step s is k = (s - 1) * grad_accum + m."""
    masks: torch.Tensor | None
    """Chat data: which tokens carry the LM loss (answers only); None for plain text."""
    heldout: dict
    eval_blocks: dict
    report: dict
    start_step: int
    n_layers: int
    t_base: float
    t_now: float | None
    """Threshold-aware training: the FATReLU threshold the model holds now."""
    alive: list[torch.Tensor] | None = None
    """Dead-neuron re-initialisation: per layer, which neurons were non-zero since the last
    check (bool (d_ff,), on the device)."""
    timings: dict = field(default_factory=dict)
    """Seconds the set-up's own measurements took (``heldout``: one held-out evaluation;
    ``benchmark``: the lm-eval of the original), for ``time_budget``."""

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_step(self) -> int:
        """Sequences per optimiser step, all processes together."""
        return self.recipe.grad_accum * self.recipe.batch_size * self.world


def _setup(recipe: Recipe, run: Path, ckpt: Path | None, accelerator,
           progress: bool = False) -> _Session:
    """Load the model, measure it, make the teacher, swap the activation, build the optimiser
    and the data, and restore a checkpoint's state when resuming."""
    from accelerate.utils import set_seed

    from prosparse.models.loading import load_model
    from prosparse.models.relufy import relufy_, set_threshold_

    set_seed(recipe.seed)
    shown = progress and accelerator.is_main_process  # bars on the main process only

    # --- model, teacher, activation swap -------------------------------------------------------
    model, tok = load_model(recipe.model)
    if recipe.data.format == "chat" and not getattr(tok, "chat_template", None):
        raise UsageError(f"data.format is chat but {recipe.model}'s tokenizer has no chat template "
                         "to render the messages with; use an instruct model's tokenizer or "
                         "data.format=text")
    measure_before = recipe.log.measure_before and ckpt is None
    by_original = recipe.threshold.reference == "original"
    needs_original = measure_before or recipe.distill.weight > 0 or \
        (recipe.eval.tasks and ckpt is None) or by_original
    original, origin = _original_model(recipe, model) if needs_original else (model, None)
    if by_original and original is None:
        raise UsageError(f"threshold.reference is original but {recipe.model} records no "
                         "original model to compare with; use threshold.reference trained")
    if TRAINED_FROM_KEY not in vars(model.config) and origin is not None:
        setattr(model.config, TRAINED_FROM_KEY, origin)  # final/ and checkpoints record it
    model.to(accelerator.device)
    if original is not None and original is not model:
        original.to(accelerator.device).eval()
    eval_len = recipe.data.heldout_seq_len or recipe.data.seq_len
    heldout = heldout_blocks(tok, recipe.data.heldout, eval_len, recipe.data.heldout_tokens)
    eval_blocks = {k: v[: max(1, recipe.log.eval_tokens // eval_len)]
                   for k, v in heldout.items()}
    report: dict = {"model": recipe.model, "recipe": str(run / "recipe.yaml"),
                    "mixed_precision": accelerator.mixed_precision}  # what dtype: auto chose
    if original is not None:
        act = config_activation(original.config) or "original"
        report["original_activation"] = {"silu": "SiLU", "swish": "SiLU", "gelu": "GELU",
                                          "gelu_pytorch_tanh": "GELU"}.get(act, act)
    if measure_before:
        if original is not None:
            report["original"] = evaluate_heldout(original, heldout, accelerator=accelerator,
                                                  progress=shown)
        else:  # a ReLU-family model that records no original: its own row, never "original"
            report["start"] = evaluate_heldout(model, heldout, accelerator=accelerator,
                                               progress=shown)
    if by_original and "original" not in report:
        # a resumed run measures it again: the threshold search is judged against it at the end
        report["original"] = evaluate_heldout(original, heldout, accelerator=accelerator,
                                              progress=shown)
    timings = {}
    if recipe.eval.tasks and ckpt is None and accelerator.is_main_process:
        key = "original" if original is not None else "start"
        t0 = time.perf_counter()
        report["benchmarks"] = {key: benchmark(original if original is not None else model,
                                               tok, recipe)}
        timings["benchmark"] = time.perf_counter() - t0
    teacher = None
    if recipe.distill.weight > 0:
        teacher = (copy.deepcopy(model) if original is model else original).eval()
        teacher.requires_grad_(False)
        if accelerator.mixed_precision == "bf16":
            bf16_teacher_linears_(teacher)
    if original is not model:
        original = None  # the teacher keeps it when distilling; the row is measured
    originals = [f.act for f in find_gated_ffns(model)]
    relufy_(model, recipe.activation, recipe.activation_param)
    if measure_before:
        t0 = time.perf_counter()
        report["relu_swap"] = evaluate_heldout(model, heldout, accelerator=accelerator,
                                               progress=shown)
        timings["heldout"] = time.perf_counter() - t0
    an = recipe.anneal
    if an.steps > 0:  # blend act0 into the swapped-in activation; exact from step an.steps on
        begin_anneal_(model, originals)
        resumed = 0 if ckpt is None else checkpoint_step(ckpt)
        set_anneal_(model, anneal_factor(resumed, an.steps, an.shape))  # the checkpoint's modules
    th = recipe.threshold  # threshold-aware training: FATReLU t rising at the end
    t_base = recipe.activation_param if recipe.activation in ("fatrelu", "drelu") else 0.0
    t_now = None  # set at the first step
    if th.train > 0 and ckpt is not None:  # the checkpoint's modules (and threshold buffers)
        t_now = train_threshold(checkpoint_step(ckpt), th.train, th.train_start, th.train_ramp,
                                t_base)
        set_threshold_(model, t_now)
    keep = recipe.weights.keep_mask
    if keep is None:
        keep = bool(getattr(model.config, "prosparse_pruning", None))
    keeper = None
    if keep:  # a pruned model's zero weights stay exactly zero (gradient hooks)
        from prosparse.pruning import keep_masks_

        keeper = keep_masks_(model)
        report["weights"] = {"keep_mask": True, "masked_linears": len(keeper.masks),
                             "zero_weights": int(sum((~m.bool()).sum() for m in
                                                     keeper.masks.values()))}
    for name, p in model.named_parameters():
        p.requires_grad_((recipe.optim.train_params == "all" or
                          any(k in name for k in ("gate_proj", "up_proj", "down_proj")))
                         and not any(k in name for k in recipe.optim.freeze))
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"optim.freeze {recipe.optim.freeze} with optim.train_params "
                         f"{recipe.optim.train_params!r} leaves nothing to train")
    model.train()
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                            fused=use_fused_adamw(params, o.fused))
    model, opt = accelerator.prepare(model, opt)

    # --- data: global micro-batch k of step s is k = (s - 1) * grad_accum + m -------------------
    per_step = recipe.grad_accum * recipe.batch_size * accelerator.num_processes
    with accelerator.main_process_first():
        blocks, masks = build_blocks(tok, recipe.data.sources, recipe.data.weights,
                                     recipe.data.seq_len, recipe.total_steps * per_step,
                                     recipe.seed, run / "data" if recipe.data.cache else None,
                                     chat=recipe.data.format == "chat")

    start_step = 0
    if ckpt is not None:
        start_step = load_checkpoint(accelerator, ckpt)["step"]
        if keeper is not None:
            keeper.remask()  # moments restored from a checkpoint cannot move a masked weight
    return _Session(recipe=recipe, run=run, accelerator=accelerator, model=model, tok=tok,
                    opt=opt, teacher=teacher, blocks=blocks, masks=masks, heldout=heldout,
                    eval_blocks=eval_blocks, report=report, start_step=start_step,
                    n_layers=len(find_gated_ffns(model)), t_base=t_base, t_now=t_now,
                    timings=timings)


def _original_model(recipe: Recipe, model: torch.nn.Module
                    ) -> tuple[torch.nn.Module | None, str | None]:
    """The original model of a run (its "original" row, and the teacher when distilling) and
    the spec it is recorded under in the checkpoints the run writes.

    ``model`` itself when it still runs its own activation (SiLU); ``distill.teacher`` when the
    recipe names one; the model a ``prosparse train`` checkpoint records it started from; a
    converted checkpoint with its recorded original activation put back (its weights are the
    original's). ``(None, None)`` for a ReLU-family model that records none of these, which
    then cannot distil."""
    from prosparse.models.loading import load_model

    def load(spec: str, why: str) -> torch.nn.Module:
        try:
            m, _ = load_model(spec)
        except UsageError as e:
            raise UsageError(f"{why} {spec!r}, which does not load ({e}); name the teacher with "
                             "distill.teacher=PATH") from None
        restore_original_activation_(m)  # a converted checkpoint as teacher: its original
        return m

    if recipe.distill.teacher:
        return load(recipe.distill.teacher, "distill.teacher is"), recipe.distill.teacher
    act = current_activation(model)[0]
    if act.startswith("other:"):
        return model, recipe.model
    started = getattr(model.config, TRAINED_FROM_KEY, None)
    if started:
        return load(started, f"{recipe.model} was trained from"), started
    if getattr(model.config, ORIGINAL_ACT_KEY, None):
        original = copy.deepcopy(model)
        restore_original_activation_(original)
        return original, recipe.model
    if recipe.distill.weight > 0:
        raise UsageError(f"distill.weight is {recipe.distill.weight:g} but {recipe.model} already "
                         f"runs {act} and records no original model to learn from; name the "
                         "teacher with distill.teacher=PATH, or set distill.weight=0")
    return None, None


def _step(s: _Session, step: int) -> dict:
    """One optimiser step (``grad_accum`` micro-batches); returns its metrics record."""
    from prosparse.models.relufy import set_threshold_

    recipe, accelerator, model = s.recipe, s.accelerator, s.model
    t_step = time.perf_counter()
    lam = l1_factor(step, recipe.stages)
    an, th = recipe.anneal, recipe.threshold
    alpha = anneal_factor(step, an.steps, an.shape) if an.steps > 0 else 1.0
    if an.steps > 0:
        set_anneal_(model, alpha)
    if th.train > 0:
        t = train_threshold(step, th.train, th.train_start, th.train_ramp, s.t_base)
        if t != s.t_now:  # unwrapped, so the config (and each checkpoint) names it too
            set_threshold_(accelerator.unwrap_model(model), t)
            s.t_now = t
    lr = lr_at(step, recipe)
    for group in s.opt.param_groups:
        group["lr"] = lr
    match_hidden = recipe.distill.hidden_weight > 0  # the recipe refuses it without a teacher
    world, rank = s.world, accelerator.process_index
    # lm, pen, kd, loss, hidden
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    collector = PenaltyCollector(s.n_layers, recipe.penalty.normalization,
                                 recipe.penalty.scale, recipe.grad_accum, enabled=lam > 0)
    reinit = recipe.optim.reinit_dead_every
    if reinit and s.alive is None:
        s.alive = [torch.zeros(f.down_proj.in_features, dtype=torch.bool,
                               device=accelerator.device)
                   for f in find_gated_ffns(accelerator.unwrap_model(model))]

    def observe(i: int, x1: torch.Tensor) -> None:
        collector(i, x1)
        if s.alive is not None:
            s.alive[i] |= (x1.detach() != 0).reshape(-1, x1.shape[-1]).any(dim=0)

    with capture_x1(model, observe):
        for m in range(recipe.grad_accum):
            k = (step - 1) * recipe.grad_accum + m
            ids = micro_batch(s.blocks, k, recipe.batch_size, rank, world).to(accelerator.device)
            mask = None if s.masks is None else micro_batch(
                s.masks, k, recipe.batch_size, rank, world).to(accelerator.device)
            with accelerator.accumulate(model):
                out = model(input_ids=ids, output_hidden_states=match_hidden)
                # (batch, seq, vocab); one fp32 copy for both losses (bf16 under autocast)
                logits = out.logits.float()
                lm = lm_loss(logits, ids, mask)  # chat data: answer tokens only
                penalty = collector.take()
                kd = torch.zeros((), device=logits.device)
                hid = torch.zeros((), device=logits.device)
                if s.teacher is not None and (not recipe.distill.steps
                                              or step <= recipe.distill.steps):
                    with torch.no_grad(), accelerator.autocast():
                        t_out = s.teacher(input_ids=ids, output_hidden_states=match_hidden)
                    kd = kd_loss(logits, t_out.logits, recipe.distill.temperature)
                    if match_hidden:
                        hid = hidden_loss(out.hidden_states, t_out.hidden_states)
                # The objective, in one line (paper Section 3.2, + opt-in distillation):
                loss = (recipe.distill.lm_weight * lm + lam * penalty
                        + recipe.distill.weight * kd + recipe.distill.hidden_weight * hid)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if recipe.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                    s.opt.step()
                    s.opt.zero_grad(set_to_none=True)
            # on the device: the step's one read-back is the reduced stats below
            sums += torch.stack([lm.detach(), penalty.detach(), kd.detach(),
                                 loss.detach(), hid.detach()]).to(sums)
    counts = collector.zeros
    stats = torch.cat([sums / recipe.grad_accum, counts.zeros.to(sums), counts.total.to(sums)])
    stats = accelerator.reduce(stats, reduction="sum").cpu()
    lm_v, pen_v, kd_v, loss_v, hid_v = (stats[:5] / world).tolist()
    zeros, total = stats[5:5 + s.n_layers], stats[5 + s.n_layers:]
    record = {"step": step, "stage": stage_index(step, recipe.stages), "lambda": lam,
              "lr": lr, "lm_loss": lm_v, "penalty": pen_v, "kd_loss": kd_v, "loss": loss_v,
              "train_sparsity": float((zeros / total.clamp(min=1)).mean()),
              "tokens": step * s.per_step * recipe.data.seq_len,
              # the optimiser step's wall time (read-back included, held-out eval not)
              "step_seconds": time.perf_counter() - t_step}
    if match_hidden:
        record["hidden_loss"] = hid_v
    if an.steps > 0:
        record["anneal"] = alpha
    if th.train > 0:
        record["threshold"] = s.t_now
    if reinit and step % reinit == 0:
        record["reinit_dead"] = _reinit_dead_(s, step)
    return record


@torch.no_grad()
def _reinit_dead_(s: _Session, step: int) -> int:
    """Draw again the gate rows of the neurons that stayed at zero since the last check (at
    their layer's RMS row scale, the same draw on every process), zero their down-projection
    columns, clear the AdamW moments of both, and start counting afresh. Returns how many were
    re-initialised.

    A revived neuron starts with no output: its old down-projection column was never trained
    while it was dead, and some (SmolLM2's massive-activation neurons among them) are large
    enough that firing them at once sends the perplexity into the thousands. From zero, the
    column grows only as the loss asks for it."""
    accelerator = s.accelerator
    n = 0
    for i, ffn in enumerate(find_gated_ffns(accelerator.unwrap_model(s.model))):
        alive = s.alive[i]
        if accelerator.num_processes > 1:  # dead on every process
            alive = accelerator.reduce(alive.int(), reduction="sum") > 0
        dead = (~alive).nonzero().flatten()
        s.alive[i].zero_()
        if dead.numel() == 0 or ffn.fused:
            continue
        w = ffn.module.gate_proj.weight
        scale = w.float().pow(2).mean().sqrt()  # the layer's RMS row scale
        gen = torch.Generator().manual_seed(s.recipe.seed * 1_000_003 + step * 101 + i)
        fresh = torch.randn(dead.numel(), w.shape[1], generator=gen) * scale
        w[dead] = fresh.to(device=w.device, dtype=w.dtype)
        down = ffn.module.down_proj.weight
        down[:, dead] = 0
        for p, idx in ((w, (dead,)), (down, (slice(None), dead))):
            state = s.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][idx] = 0
        n += dead.numel()
    return n


class TrainingDiverged(UsageError):
    """The loss or the weights went non-finite: the run stops, keeps its last finite
    checkpoint and writes no final model (one line, exit 2, on the command line)."""


class _LossWatch:
    """Divergence: a non-finite loss or non-finite weights stop the run (naming the step and
    the likely cause); a loss that climbs far above where it started is a warning, logged once
    and kept in the report."""

    WINDOW = 10  # steps whose median is compared
    RISE = 1.0  # nats above the start (e ~ 2.7x the perplexity) that count as an explosion

    def __init__(self, s: _Session):
        self.s = s
        self.first: list[float] = []
        self.recent: list[float] = []
        self.warnings: list[str] = []

    def _cause(self) -> str:
        o = self.s.recipe.optim
        clip = "no gradient clipping (optim.grad_clip 0)" if o.grad_clip == 0 else \
            f"optim.grad_clip {o.grad_clip:g}"
        return (f"optim.lr {o.lr:g} with {clip}: lower optim.lr"
                + (" or set optim.grad_clip (e.g. 1.0)" if o.grad_clip == 0 else ""))

    def _last_checkpoint(self) -> str:
        from prosparse.training.checkpoint import latest_checkpoint

        ck = latest_checkpoint(self.s.run)
        return (f"; the last finite checkpoint is {ck} (--resume continues from it)" if ck
                else "; no checkpoint was written")

    def check(self, step: int, record: dict) -> None:
        loss, lm = record["loss"], record["lm_loss"]
        if not (math.isfinite(loss) and math.isfinite(lm)):
            raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss} "
                                   f"(likely cause: {self._cause()}); no final model was "
                                   f"written{self._last_checkpoint()}")
        if len(self.first) < self.WINDOW:
            self.first.append(lm)
            return
        self.recent = (self.recent + [lm])[-self.WINDOW:]
        start, now = sorted(self.first)[self.WINDOW // 2], sorted(self.recent)[len(self.recent) // 2]
        if not self.warnings and len(self.recent) == self.WINDOW and now > start + self.RISE:
            msg = (f"the LM loss climbed from {start:.2f} at the start to {now:.2f} by step "
                   f"{step} (perplexity x{math.exp(now - start):.1f}); the run is diverging "
                   f"({self._cause()})")
            log.warning("warning: %s", msg)
            self.warnings.append(msg)

    def check_weights(self, step: int) -> None:
        bad = any(not torch.isfinite(p).all() for p in self.s.model.parameters())
        if _on_any_rank(self.s.accelerator, bad):
            raise TrainingDiverged(f"training diverged by step {step}: the weights hold NaN or "
                                   f"inf (likely cause: {self._cause()}); no final model was "
                                   f"written{self._last_checkpoint()}")


def budget_steps(recipe: Recipe, *, elapsed: float, done: int, step_seconds: float,
                 heldout_seconds: float, eval_fraction: float, benchmark_seconds: float = 0.0
                 ) -> tuple[int, float]:
    """``time_budget``: the most optimiser steps (at most the recipe's) whose run ends within
    the budget, and the minutes the schedule as written would take; at least one step more than
    ``done`` and one per stage, even when that overruns.

    The estimate: ``elapsed`` seconds so far (``done`` steps made), ``step_seconds`` for each
    step still to make, a held-out evaluation of ``eval_fraction`` x ``heldout_seconds`` every
    ``log.eval_every`` steps and at the last, and the end of the run: the trained measurement,
    each threshold the sweep tries besides the trained one (the final row is the sweep's), or
    the final measurement after a fixed threshold, or about a dozen for per-layer thresholds
    (``heldout_seconds`` each), the final lm-eval (``benchmark_seconds``, what the original's
    took) and saving (two evaluations' worth)."""
    th, every = recipe.threshold, recipe.log.eval_every
    if th.per_layer:
        end = 2 + 12
    elif th.value is None:  # the trained t and the chosen t are not measured again
        end = 1 + len(set(th.sweep) - {th.train})
    else:
        end = 2
    end = (end + 2) * heldout_seconds + benchmark_seconds

    def minutes(n: int) -> float:
        evals = (n // every - done // every + (n % every != 0)) if every else 1
        return (elapsed + (n - done) * step_seconds + evals * eval_fraction * heldout_seconds
                + end) / 60

    total, budget = recipe.total_steps, recipe.time_budget
    full = minutes(total)
    if full <= budget:
        return total, full
    lo = max(done + 1, len(recipe.stages))
    if lo >= total:
        return total, full
    n = lo
    for cand in range(lo, total):  # minutes() grows with n: the last that fits
        if minutes(cand) > budget:
            break
        n = cand
    return min(n, total - 1), full


def _fit_budget(s: _Session, wall_start: float, done: int, seconds: list[float],
                main: bool) -> dict:
    """Time the probe steps and, where the schedule would overrun ``time_budget``, compress
    it (:func:`~prosparse.training.recipe.scale_schedule`); returns the decision."""
    recipe = s.recipe
    step_s = sorted(seconds)[len(seconds) // 2]  # median: a slow first step or GC is no guide
    held = sum(int(v.shape[0]) for v in s.heldout.values())
    frac = sum(int(v.shape[0]) for v in s.eval_blocks.values()) / max(1, held)
    heldout_s = s.timings.get("heldout")
    if heldout_s is None:  # not measured before training: a forward costs ~1/3 of a step
        tokens = held * (recipe.data.heldout_seq_len or recipe.data.seq_len)
        heldout_s = step_s / 3 * tokens / (s.per_step * recipe.data.seq_len)
    steps, full = budget_steps(recipe, elapsed=time.time() - wall_start, done=done,
                               step_seconds=step_s, heldout_seconds=heldout_s,
                               eval_fraction=frac,
                               benchmark_seconds=s.timings.get("benchmark", 0.0))
    if s.world > 1:  # every process trains the same schedule: the most cautious estimate
        acc = s.accelerator
        steps = int(acc.gather(torch.tensor([steps], device=acc.device)).min())
    decision = {"minutes": recipe.time_budget, "step_seconds": round(step_s, 4),
                "planned_steps": recipe.total_steps, "steps": steps,
                "estimated_minutes": round(full, 2)}
    if steps < recipe.total_steps:
        log.info("time_budget %g min: %d steps at %.2f s a step would end after about %.1f "
                 "min; training %d steps, the schedule scaled by %.3f",
                 recipe.time_budget, recipe.total_steps, step_s, full, steps,
                 steps / recipe.total_steps)
    else:
        log.info("time_budget %g min: the %d steps fit (about %.1f min at %.2f s a step)",
                 recipe.time_budget, recipe.total_steps, full, step_s)
    if main:
        record_budget(s.run, decision)
    return decision


def _apply_budget(s: _Session, decision: dict) -> Recipe:
    if decision["steps"] < s.recipe.total_steps:
        s.recipe = scale_schedule(s.recipe, decision["steps"])
        decision["stages"] = [{"lambda": st.lam, "steps": st.steps} for st in s.recipe.stages]
    s.report["time_budget"] = decision
    return s.recipe


def _train(recipe: Recipe, run: Path, ckpt: Path | None, accelerator, stop_after: int | None,
           progress: bool, wall_start: float) -> TrainResult:
    s = _setup(recipe, run, ckpt, accelerator, progress)
    main = accelerator.is_main_process
    log = MetricsLog(run, main, recipe.log.tensorboard, s.start_step)
    budget = recipe.time_budget > 0
    if budget and ckpt is not None and (kept := recorded_budget(run)) is not None:
        recipe = _apply_budget(s, dict(kept))  # resumed: the schedule the run started
        budget = False
    last = recipe.total_steps if stop_after is None else min(recipe.total_steps,
                                                             s.start_step + stop_after)
    bar = tqdm(range(s.start_step + 1, last + 1), initial=s.start_step, total=recipe.total_steps,
               disable=not (progress and main), desc="train")
    lambdas = []
    watch = _LossWatch(s)
    probe: list[float] = []
    for step in bar:
        if step > last:  # a time budget shortened the run
            break
        record = _step(s, step)
        if budget:
            if step > s.start_step + 1:  # the first step warms up; not a guide
                probe.append(record["step_seconds"])
            if len(probe) == BUDGET_PROBE_STEPS or step == last:
                recipe = _apply_budget(s, _fit_budget(s, wall_start, step, probe, main))
                last = recipe.total_steps if stop_after is None else min(
                    recipe.total_steps, s.start_step + stop_after)
                bar.total = recipe.total_steps
                bar.refresh()
                budget = False
        lambdas.append(record["lambda"])
        watch.check(step, record)  # a non-finite loss stops the run here, before any save
        if (recipe.log.eval_every and step % recipe.log.eval_every == 0) or \
                step == recipe.total_steps:
            ev = evaluate_heldout(s.model, s.eval_blocks, accelerator=accelerator)
            record.update(heldout_perplexity=ev["perplexity"],
                          heldout_sparsity=ev["average_sparsity"],
                          heldout_layer_sparsity=ev["layer_sparsity"])
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lm=f"{record['lm_loss']:.3f}",
                        lam=f"{record['lambda']:.3g}",
                        sparsity=f"{100 * record['train_sparsity']:.1f}%")
        ck = recipe.checkpoint
        if (ck.every and step % ck.every == 0) or (stop_after is not None and step == last):
            watch.check_weights(step)  # never a non-finite checkpoint
            trainer = {"step": step, "micro_batches": step * recipe.grad_accum,
                       "data_position": step * s.per_step, "tokens": record["tokens"],
                       "lambda": record["lambda"], "lr": record["lr"], "world_size": s.world}
            save_checkpoint(accelerator, s.model, s.tok, run, step, trainer, ck.keep)
    bar.close()
    log.close()
    if last < recipe.total_steps:
        return TrainResult(run=run, step=last, lambdas=lambdas)

    # --- end of training: threshold shift (paper Section 3.2, Appendix O) ----------------------
    watch.check_weights(recipe.total_steps)  # no final model from diverged weights
    report = s.report
    report["tokens_trained"] = recipe.total_steps * s.per_step * recipe.data.seq_len
    if watch.warnings:
        report["warnings"] = list(watch.warnings)
    report = finish_run(accelerator, s.model, s.tok, recipe, run, s.heldout, report, wall_start,
                        progress=progress)
    return TrainResult(run=run, step=recipe.total_steps, report=report, lambdas=lambdas)
