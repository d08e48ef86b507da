"""``prosparse sparsity`` and ``prosparse threshold``."""

from __future__ import annotations

from prosparse.cli import args as a
from prosparse.core import checks
from prosparse.core.tables import format_table, pct
from prosparse.data import DEFAULT_DATA, check_data


def sparsity_table(result: dict) -> str:
    """Per data source: tokens, perplexity, x1 sparsity, and for TEAL models the share of
    block-linear inputs skipped."""
    teal = "average_input_sparsity" in result
    rows = [[name, d["tokens"], f"{d['perplexity']:.2f}", pct(d["average_sparsity"])]
            + ([pct(d["average_input_sparsity"])] if teal else [])
            for name, d in result["datasets"].items()]
    return format_table(["data", "tokens", "perplexity", "sparsity %"]
                        + (["linear inputs skipped %"] if teal else []), rows)


def _sparsity(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.measure.sparsity import measure_sparsity
    from prosparse.models.loading import load_model

    check_data(args.data or [DEFAULT_DATA])
    a.activation_from_args(args)  # conflicting flags fail before the model loads
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    a.apply_activation_args(model, args)
    if args.ppl_tolerance is not None:
        return _ppl_p(args, model, tok)
    result = measure_sparsity(model, tok, args.data or [DEFAULT_DATA], tokens=args.tokens,
                              seq_len=args.seq_len, batch_size=args.batch_size,
                              model_name=args.model)
    print(sparsity_table(result))
    print(f"average sparsity: {pct(result['average_sparsity'])}%")
    if "input_sparsity" in result:  # TEAL: the fraction of each linear's input skipped
        per = result["input_sparsity"]
        print(f"linear inputs skipped (TEAL): average {pct(result['average_input_sparsity'])}% "
              f"over {len(per)} linears ({pct(min(per.values()))}..{pct(max(per.values()))}%)")
    if "weight_sparsity" in result:  # a pruned model
        w = result["weight_sparsity"]
        comp = "n/a" if w["compliance"] is None else f"{pct(w['compliance'])}%"
        print(f"weight sparsity: {pct(w['zeros'])}% zeros in {len(w['layers'])} block linears, "
              f"{w['pattern']} compliance {comp}")
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from prosparse.core.plots import plot_layer_sparsity

        plot_layer_sparsity({k: v["layer_sparsity"] for k, v in result["datasets"].items()},
                            args.plot, title=f"Layer-wise sparsity: {args.model}")
    return 0


def _ppl_p(args, model, tok) -> int:
    """``--ppl-tolerance P``: the Sparsing Law's PPL-P sparsity (CETT cut-offs per layer)."""
    import torch

    from prosparse.core.io import write_json
    from prosparse.measure.cett import ppl_p_sparsity
    from prosparse.measure.sparsity import heldout_sets

    data = args.data or [DEFAULT_DATA]
    held = heldout_sets(tok, data, args.tokens, args.seq_len)
    blocks = torch.cat(list(held.values()))
    calib = torch.cat(list(heldout_sets(tok, data, args.cett_tokens, args.seq_len,
                                                      split="train").values()))
    result = ppl_p_sparsity(model, blocks, calib, ppl_tolerance=args.ppl_tolerance,
                            batch_size=args.batch_size, calib_tokens=args.cett_tokens)
    result = {"model": args.model, "data": list(data), **result}
    p = f"PPL-{100 * args.ppl_tolerance:g}%"
    print(format_table(["", "sparsity %", "perplexity"], [
        ["as loaded (exact zeros)", pct(result["baseline_sparsity"]),
         f"{result['baseline_perplexity']:.3f}"],
        [f"{p} (CETT {result['cett_threshold']:.4f})", pct(result["average_sparsity"]),
         f"{result['perplexity']:.3f}"]]))
    print(f"{p} sparsity: {pct(result['average_sparsity'])}%")
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from prosparse.core.plots import plot_layer_sparsity

        plot_layer_sparsity({p: result["layer_sparsity"]}, args.plot,
                            title=f"{p} layer sparsity: {args.model}")
    return 0


_thresholds = checks.comma_list(checks.threshold, "0,0.005,0.01")


def _threshold(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.measure.threshold import threshold_sweep
    from prosparse.models.loading import load_model

    check_data(args.data or [DEFAULT_DATA])
    a.activation_from_args(args)  # conflicting flags fail before the model loads
    if args.out:
        checks.check_output_dir(args.out, args.overwrite)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    a.apply_activation_args(model, args)
    ref = _reference_perplexity(args, tok) if args.reference else None
    if args.per_layer:
        return _per_layer(args, model, tok, ref)
    result = threshold_sweep(model, tok, args.thresholds, data=args.data or [DEFAULT_DATA],
                             tolerance=args.tolerance, tokens=args.tokens, seq_len=args.seq_len,
                             batch_size=args.batch_size, baseline_t=args.baseline_t,
                             reference_perplexity=ref)
    rows = [[f"{r['t']:g}", pct(r["average_sparsity"]), f"{r['perplexity']:.3f}"]
            for r in result["thresholds"]]
    print(format_table(["t", "sparsity %", "perplexity"], rows))
    if not result["within_tolerance"]:
        print(f"no t is within {100 * args.tolerance:g}% of {_judged(args, result)}; "
              f"recommended t = {result['recommended']:g}, the baseline")
    else:
        print(f"recommended t = {result['recommended']:g} (perplexity within "
              f"{100 * args.tolerance:g}% of {_judged(args, result)})")
    _save(args, model, tok, result["recommended"])
    if args.json:
        write_json(args.json, result)
    return 0


def _reference_perplexity(args, tok) -> float:
    """``--reference MODEL``: its perplexity on the held-out text the thresholds are judged on
    (tokenized as the model's: the two must share a vocabulary to be compared)."""
    from prosparse.core.errors import UsageError
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.measure.sparsity import heldout_sets
    from prosparse.models.loading import load_model

    ref, ref_tok = load_model(args.reference, dtype=args.dtype, device=args.device)
    if ref_tok.get_vocab() != tok.get_vocab():
        raise UsageError(f"--reference {args.reference} has another tokenizer than {args.model}: "
                         "perplexities over different tokens do not compare; give the model "
                         "it was trained from")
    batches = heldout_sets(tok, args.data or [DEFAULT_DATA], args.tokens, args.seq_len)
    ppl = evaluate_heldout(ref, batches, args.batch_size)["perplexity"]
    print(f"reference {args.reference}: perplexity {ppl:.3f}")
    return ppl


def _save(args, model, tok, t) -> None:
    """``--out``: the model with the chosen threshold(s) applied, a checkpoint to deploy."""
    if not args.out:
        return
    from prosparse.models.relufy import current_activation, set_threshold_
    from prosparse.models.saving import save_model

    set_threshold_(model, t)
    path = save_model(model, tok, args.out, overwrite=args.overwrite)
    print(f"wrote {path} ({a.describe_activation(*current_activation(model))})")


def _judged(args, result: dict) -> str:
    if result.get("reference_perplexity") is not None:
        return f"{args.reference}: {result['reference_perplexity']:.3f}"
    return f"t = {args.baseline_t:g}: {result['baseline_perplexity']:.3f}"


def _per_layer(args, model, tok, ref: float | None = None) -> int:
    """``threshold --per-layer``: one FATReLU threshold per layer from a shared CETT budget."""
    from prosparse.core.io import write_json
    from prosparse.measure.threshold import per_layer_thresholds

    result = per_layer_thresholds(model, tok, data=args.data or [DEFAULT_DATA],
                                  tolerance=args.tolerance, tokens=args.tokens,
                                  seq_len=args.seq_len, batch_size=args.batch_size,
                                  baseline_t=args.baseline_t, reference_perplexity=ref)
    ts = result["layer_thresholds"]
    print(format_table(["layer", "t", "sparsity %"],
                       [[i, f"{t:.4g}", pct(s)] for i, (t, s) in
                        enumerate(zip(ts, result["layer_sparsity"]))]))
    if not result["within_tolerance"]:
        print(f"the model at t = {args.baseline_t:g} is already past "
              f"{100 * args.tolerance:g}% of {_judged(args, result)}: perplexity "
              f"{result['perplexity']:.3f}; the thresholds stay at t = {args.baseline_t:g}")
    else:
        print(f"per-layer thresholds: sparsity {pct(result['average_sparsity'])}% at perplexity "
              f"{result['perplexity']:.3f} (within {100 * args.tolerance:g}% of "
              f"{_judged(args, result)}); deploy with relufy_(model, 'fatrelu', "
              "layer_thresholds) or the recipe's threshold.per_layer")
    _save(args, model, tok, ts)
    if args.json:
        write_json(args.json, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("sparsity", help="measure activation sparsity and perplexity",
                       description="Count exact zeros of every FFN's intermediate output x1 "
                                   "(the input of down_proj) per layer, with perplexity, on "
                                   "held-out text.")
    a.add_model_args(p)
    a.add_activation_args(p, default=None)
    a.add_data_args(p)
    p.add_argument("--ppl-tolerance", type=checks.positive_float, default=None, metavar="P",
                   help="report PPL-P sparsity instead (the Sparsing Law's metric): the share "
                        "of x1 that per-layer CETT cut-offs drop while perplexity stays within "
                        "1+P of the model's own, e.g. 0.01 for PPL-1%%; any activation, SiLU too")
    p.add_argument("--cett-tokens", type=checks.positive_int, default=2048,
                   help="with --ppl-tolerance: train-split tokens of --data the cut-offs are "
                        "fitted on (default 2048)")
    a.add_json(p, "the results")
    a.add_plot(p, "the layer-wise sparsity")
    p.set_defaults(func=_sparsity)

    p = sub.add_parser("threshold", help="sweep the FATReLU threshold (paper Table 9)",
                       description="Sparsity and perplexity for each FATReLU threshold t, and "
                                   "the largest t within a perplexity tolerance of t = 0 (or of "
                                   "--baseline-t, the t a model was trained under).")
    a.add_model_args(p)
    a.add_activation_args(p, default=None)
    a.add_data_args(p)
    p.add_argument("--thresholds", type=_thresholds, default=(0.0, 0.005, 0.01, 0.02),
                   help="comma-separated thresholds (default 0,0.005,0.01,0.02)")
    p.add_argument("--tolerance", type=checks.nonneg_float, default=0.01,
                   help="relative perplexity increase allowed over t = --baseline-t "
                        "(0.01 = +1%%)")
    p.add_argument("--baseline-t", type=checks.nonneg_float, default=0.0,
                   help="the threshold the tolerance is judged against: 0 for a model trained "
                        "under plain ReLU, its threshold.train for one trained under FATReLU")
    p.add_argument("--per-layer", action="store_true",
                   help="pick one threshold per layer instead (each within a CETT budget shared "
                        "by all layers, the budget searched to the tolerance); --thresholds is "
                        "then unused")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="judge the tolerance against this model's perplexity on the same text "
                        "(e.g. the original SiLU model) instead of the model's own at "
                        "--baseline-t (no threshold goes below --baseline-t)")
    a.add_json(p, "the results")
    a.add_out(p, "save the model with the recommended threshold(s) applied", required=False)
    p.set_defaults(func=_threshold)
