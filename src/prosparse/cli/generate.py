"""``prosparse generate MODEL --prompt TEXT``: text through the exact sparse FFN, streamed, then
its tokens/s and the activation sparsity of the tokens it wrote."""

from __future__ import annotations

import sys

from prosparse.cli import args as a
from prosparse.core import checks
from prosparse.core.errors import UsageError
from prosparse.core.tables import pct

_PATHS = {"exact": "exact sparse FFN", "dense": "dense FFN",
          "predicted": "predictor-driven sparse FFN"}


def _generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from prosparse.core.io import write_json
    from prosparse.inference.generate import (
        check_predictors_fit,
        generate,
        sparse_unready,
        sparse_unready_config,
    )
    from prosparse.models.loading import load_model

    # Every mistake a user can make on the command line fails here, before the model loads.
    if not args.prompt.strip():
        raise UsageError("--prompt is empty; give the text to continue, e.g. --prompt 'The "
                         "capital of France is'")
    if args.temperature == 0 and (args.top_p is not None or args.seed is not None):
        raise UsageError("--top-p and --seed shape sampling; add --temperature T (> 0), or drop "
                         "them for greedy text")
    if args.dense and args.predictors is not None:
        raise UsageError("--dense and --predictors name two FFN paths; give one of them")
    swap = a.activation_from_args(args)
    a.check_backend(args.device, args.backend)
    if args.predictors is not None:
        check_predictors_fit(args.model, a.check_predictor_dir(args.predictors))
        why = None if swap is not None else sparse_unready_config(args.model)
        if why is not None:
            raise UsageError(f"--predictors needs a ReLU-family model: {args.model}: {why}; "
                             "convert it first (prosparse convert MODEL --act relu --out DIR) "
                             "or add --act relu")
    a.set_threads(args.threads)

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    a.apply_activation_args(model, args)
    path = "dense" if args.dense else "predicted" if args.predictors is not None else "exact"
    note, predictors = None, None
    why = sparse_unready(model)
    if why is not None and path == "predicted":
        raise UsageError(f"--predictors needs a ReLU-family model: {args.model}: {why}; convert "
                         "it first (prosparse convert MODEL --act relu --out DIR) or add --act "
                         "relu")
    if why is not None and path == "exact":
        # Not asked for by name: run what can run, and say so (and why) where it is read.
        path = "dense"
        note = (f"{args.model}: {why}; generating with the dense FFN (convert it for the exact "
                "sparse one: prosparse convert MODEL --act relu --out DIR, or add --act relu)")
        print(f"note: {note}", file=sys.stderr)
    if path == "predicted":
        from prosparse.predictors.export import load_predictors

        predictors = load_predictors(args.predictors)
    print(args.prompt, end="", flush=True)
    g = generate(model, tok, args.prompt, args.max_new_tokens, path=path, predictors=predictors,
                 temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                 seed=0 if args.seed is None else args.seed, backend=args.backend,
                 streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    predicted = "" if g.predicted_sparsity is None else \
        f", predicted sparsity {pct(g.predicted_sparsity)}%"
    print(f"{g.new_tokens} new tokens, {g.tokens_per_s:.2f} tokens/s ({_PATHS[path]}"
          f"{predicted}); activation sparsity {pct(g.average_sparsity)}% "
          f"(exact zeros of x1 at the new tokens, {len(g.layer_sparsity)} layers)")
    if args.json:
        report = {"model": args.model, **g.public(), "max_new_tokens": args.max_new_tokens,
                  "dtype": args.dtype, "device": args.device, "backend": args.backend or "auto",
                  "threads": torch.get_num_threads()}
        if note is not None:
            report["note"] = note
        write_json(args.json, report)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text through the exact sparse FFN; tokens/s "
                                        "and activation sparsity",
                       description="Continue --prompt, greedy (or sampled with --temperature), "
                                   "through the exact sparse FFN, whose text is the dense "
                                   "model's; --dense runs the dense FFN to compare, --predictors "
                                   "the predictor-driven one (approximate). The text streams as "
                                   "it comes; then tokens/s (decode steps) and the fraction of "
                                   "exact zeros of x1 at the generated tokens. A model whose "
                                   "FFN is not ReLU-family runs dense, with a note.")
    a.add_model(p)
    a.add_prompt(p, role="the text to continue")
    p.add_argument("--max-new-tokens", type=checks.positive_int, default=64, metavar="N",
                   help="most tokens to generate; fewer when the model ends its text "
                        "(default 64)")
    p.add_argument("--temperature", type=checks.nonneg_float, default=0.0, metavar="T",
                   help="sample at temperature T; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=checks.open_fraction, default=None, metavar="P",
                   help="with --temperature: sample from the smallest set of tokens holding P "
                        "of the probability (default 1)")
    a.add_seed(p, None, "with --temperature: the sampling seed (default 0)")
    p.add_argument("--dense", action="store_true", help="run the dense FFN, to compare")
    a.add_predictors(p, "run the predictor-driven sparse FFN through them (approximate)")
    a.add_activation_args(p, default=None)
    a.add_dtype(p)
    a.add_device(p)
    a.add_backend(p)
    a.add_threads(p)
    a.add_json(p, "text (the new text), new_tokens, tokens_per_s, average_sparsity, "
                  "layer_sparsity, path, prompt, model, ...")
    p.set_defaults(func=_generate)
