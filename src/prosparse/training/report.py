"""End of a run: threshold shift, final checkpoint, report.json, plots and the before/after table.

``report.json`` keys: ``original``, ``relu_swap``, ``trained``, ``final`` (each
``{"average_sparsity", "perplexity", "layer_sparsity", "datasets"}``, held-out, fractions in
[0, 1]), ``threshold``, ``threshold_sweep``, ``tokens_trained``, ``wall_seconds``, ``recipe``.
A shifted ReLU run keeps its shift: ``threshold`` is null, ``shift`` holds b and
``threshold_skipped`` says why no threshold was applied.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prosparse.core.io import atomic_dir, write_json
from prosparse.core.tables import format_table, pct
from prosparse.measure.heldout import evaluate_heldout
from prosparse.models.relufy import current_activation, set_threshold_
from prosparse.training.checkpoint import full_state_dict
from prosparse.training.metrics import read_metrics

log = logging.getLogger(__name__)

ROWS = (("original", "original (SiLU)"), ("start", "starting checkpoint (no original recorded)"),
        ("relu_swap", "bare ReLU swap"),
        ("trained", "after training"), ("final", "after threshold shift"))


def benchmark(model, tokenizer, recipe) -> dict:
    """The recipe's small lm-eval run (``eval.tasks``, first ``eval.limit`` documents each)."""
    from prosparse.evaluation import evaluate as lm_evaluate

    was_training = model.training
    result = lm_evaluate(model, tokenizer, recipe.eval.tasks, limit=recipe.eval.limit)
    model.train(was_training)
    return result


def before_after_table(report: dict) -> str:
    """Markdown table: sparsity and held-out perplexity of each phase."""
    rows = []
    for key, label in ROWS:
        r = report.get(key)
        if r is None:
            continue
        if key == "original" and report.get("original_activation"):
            label = f"original ({report['original_activation']})"
        elif key == "final" and report.get("threshold") is None and "shift" in report:
            label = f"final, shifted ReLU kept (b={report['shift']:g}, no threshold)"
        elif key == "final":
            t = report.get("threshold", 0)
            label = (f"{label} (t per layer, {min(t):g}..{max(t):g})"
                     if isinstance(t, list) else f"{label} (t={t:g})")
        rows.append([label, pct(r["average_sparsity"]), f"{r['perplexity']:.2f}"])
    return format_table(["model", "sparsity %", "held-out ppl"], rows)


def benchmark_table(report: dict) -> str:
    """Markdown in paper Table 3's layout: the recipe's lm-eval tasks (%) per measured model,
    held-out average sparsity last."""
    from prosparse.evaluation.report import compare, compare_table

    bench = report["benchmarks"]
    sparsity = {k: report[k]["average_sparsity"] for k in bench if k in report}
    return compare_table(compare(bench, sparsity), tasks=True)


def _plots(run: Path, report: dict) -> list[str]:
    try:
        from prosparse.core.plots import plot_curves, plot_layer_sparsity
    except ImportError:
        return []
    made = []
    try:
        metrics = read_metrics(run)
        steps = [m["step"] for m in metrics]
        curves = {"lambda": [m["lambda"] for m in metrics],
                  "lm loss": [m["lm_loss"] for m in metrics],
                  "train sparsity %": [100 * m["train_sparsity"] for m in metrics]}
        if any(m["kd_loss"] for m in metrics):
            curves["kd loss"] = [m["kd_loss"] for m in metrics]
        if any("hidden_loss" in m for m in metrics):
            curves["hidden loss"] = [m.get("hidden_loss", 0.0) for m in metrics]
        made.append(str(plot_curves(steps, curves, run / "training.png",
                                    title="lambda, loss and sparsity along training (Fig. 2)")))
        series = {label: report[key]["layer_sparsity"] for key, label in ROWS
                  if key in report and key != "original"}
        made.append(str(plot_layer_sparsity(series, run / "layer_sparsity.png",
                                            title="layer-wise sparsity, held-out (Fig. 4)")))
    except ImportError:
        pass
    return made


def finish_run(accelerator, model, tokenizer, recipe, run: Path, heldout: dict, report: dict,
               wall_start: float, progress: bool = False) -> dict:
    """Measure the trained model, shift the threshold, save ``final/``, write the report."""
    shown = progress and accelerator.is_main_process
    report["trained"] = evaluate_heldout(model, heldout, accelerator=accelerator, progress=shown)
    th = recipe.threshold
    final = None
    # The unwrapped model: a DDP/FSDP wrapper has no .config, which must name the activation.
    act, param = current_activation(accelerator.unwrap_model(model))
    if act == "shifted_relu":
        # A threshold on top of relu(g - b) is not an activation we have (nor the paper's):
        # the shifted baseline (Section 4.4) ends as it trained.
        reason = (f"the model runs shifted ReLU relu(g - {param:g}); a FATReLU threshold on top "
                  "of the shift is not an activation prosparse has, so the final model keeps its "
                  "shift and no threshold is applied")
        log.warning("threshold shift skipped: %s", reason)
        report.update(threshold=None, shift=param, threshold_skipped=reason)
    else:
        reference = report["original"]["perplexity"] if th.reference == "original" else None
        if th.per_layer:
            from prosparse.measure.threshold import per_layer_thresholds

            chosen = per_layer_thresholds(
                accelerator.unwrap_model(model), tokenizer, data=recipe.data.heldout,
                tolerance=th.tolerance, tokens=recipe.data.heldout_tokens,
                seq_len=recipe.data.heldout_seq_len or recipe.data.seq_len, progress=shown,
                baseline_t=th.train, reference_perplexity=reference)
            report["threshold_per_layer"] = {k: v for k, v in chosen.items()
                                             if k not in ("datasets",)}
            t = chosen["layer_thresholds"]
        elif th.value is None:
            from prosparse.measure.threshold import threshold_sweep

            # The trained model as measured above is the sweep's point at its own threshold.
            here = {0.0: report["trained"]} if act == "relu" else \
                {float(param): report["trained"]} if act in ("fatrelu", "drelu") and \
                isinstance(param, (int, float)) else {}
            sweep = threshold_sweep(accelerator.unwrap_model(model), tokenizer, list(th.sweep),
                                    data=recipe.data.heldout, tolerance=th.tolerance,
                                    tokens=recipe.data.heldout_tokens,
                                    seq_len=recipe.data.heldout_seq_len or recipe.data.seq_len,
                                    progress=shown, baseline_t=th.train,
                                    reference_perplexity=reference, measured=here)
            report["threshold_sweep"] = sweep
            t = float(sweep["recommended"])
            rows = {**here, **{r["t"]: r for r in sweep["thresholds"]}}
            if t in rows:  # already measured at the chosen t: the final row is that one
                final = {k: v for k, v in rows[t].items() if k != "t"}
        else:
            t = float(th.value)
        report["threshold"] = t  # one t, or one per layer
        set_threshold_(accelerator.unwrap_model(model), t)
    if final is None:
        final = evaluate_heldout(model, heldout, accelerator=accelerator, progress=shown)
    report["final"] = final
    vocab = getattr(getattr(accelerator.unwrap_model(model), "config", None), "vocab_size", None)
    if vocab and report["final"]["perplexity"] > vocab / 2:
        msg = (f"the final held-out perplexity {report['final']['perplexity']:.1f} is near the "
               f"vocabulary size ({vocab}): the model predicts almost uniformly; training "
               "diverged or the learning rate is far too high")
        log.warning("warning: %s", msg)
        report.setdefault("warnings", []).append(msg)
    final = run / "final"
    unwrapped = accelerator.unwrap_model(model)
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        with atomic_dir(final, overwrite=True, kind="model") as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    report["final_checkpoint"] = str(final)
    if recipe.eval.tasks and accelerator.is_main_process:
        # Scored as the original was (before accelerate.prepare) and as final/ loads: without
        # the mixed-precision autocast wrapper that unwrap_model keeps by default. Under bf16
        # autocast the lm-eval of a thresholded model reads points lower than its checkpoint's.
        plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        report.setdefault("benchmarks", {})["final"] = benchmark(plain, tokenizer, recipe)
    report["wall_seconds"] = time.time() - wall_start
    if accelerator.is_main_process:
        report["table"] = before_after_table(report)
        if report.get("benchmarks"):
            report["benchmark_table"] = benchmark_table(report)
        (run / "table.md").write_text(
            "\n\n".join(report[k] for k in ("table", "benchmark_table") if k in report) + "\n")
        report["plots"] = _plots(run, report)
        write_json(run / "report.json", report)
    return report
