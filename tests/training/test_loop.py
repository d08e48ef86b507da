"""The training loop on a tiny random model: resume is exact, the report and final model load."""

import json

import pytest
import torch

from prosparse.training import read_metrics, train
from prosparse.training.recipe import load_recipe


def tiny_recipe(model_dir, text_file, *extra):
    return load_recipe(None, [
        f"model={model_dir}", f"data.sources=[{text_file}]", f"data.heldout=[{text_file}]",
        "data.seq_len=32", "data.heldout_tokens=128", "log.eval_tokens=64", "log.eval_every=3",
        "log.tensorboard=false", "batch_size=2", "grad_accum=2",
        "stages=[{lambda: 0, steps: 2}, {lambda: 0.5, steps: 4}, {lambda: 1.0, steps: 6}]",
        "penalty.normalization=mean", "optim.lr=1e-3", "optim.warmup_steps=2",
        "checkpoint.every=0", "checkpoint.keep=2", "threshold.value=0.01",
        # fp32 whatever the CPU: `dtype: auto` is bf16 on CPUs with AVX512-BF16/AMX, and these
        # tests hold runs to each other at fp32 tolerances
        "dtype=fp32", *extra])


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_resume_is_exact(tiny_dir, text_file, tmp_path, distill):
    recipe = tiny_recipe(tiny_dir, text_file, f"distill.weight={distill}")
    _reset_accelerate()
    full = train(recipe, tmp_path / "full", progress=False)
    _reset_accelerate()
    part = train(recipe, tmp_path / "part", stop_after=3, progress=False)
    assert part.step == 3 and not part.report
    assert (tmp_path / "part/checkpoints/step-000003/model/config.json").is_file()
    _reset_accelerate()
    resumed = train(recipe, tmp_path / "part", resume=True, progress=False)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("lambda", "lr", "lm_loss", "penalty", "kd_loss", "loss", "train_sparsity"):
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]} vs {y[key]}"
    assert [m["lambda"] for m in a] == [0.0, 0.0, 0.5, 0.5, 0.75, 1.0]
    assert (distill > 0) == (a[-1]["kd_loss"] > 0)
    assert resumed.report["final"]["perplexity"] == full.report["final"]["perplexity"]


def test_report_and_final_checkpoint_load(tiny_dir, text_file, tmp_path):
    from prosparse import load_model
    from prosparse.models.relufy import current_activation

    _reset_accelerate()
    res = train(tiny_recipe(tiny_dir, text_file), tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run/report.json").read_text())
    for key in ("original", "relu_swap", "trained", "final"):
        assert 0 <= report[key]["average_sparsity"] <= 1 and report[key]["perplexity"] > 1
    assert report["original"]["average_sparsity"] == 0.0  # SiLU has no exact zeros
    assert report["final"]["average_sparsity"] >= report["trained"]["average_sparsity"]
    assert report["threshold"] == 0.01 and report["tokens_trained"] == 6 * 2 * 2 * 32
    assert "after threshold shift (t=0.01)" in report["table"]
    model, _ = load_model(str(tmp_path / "run/final"))
    assert current_activation(model) == ("fatrelu", 0.01)
    recipe_saved = (tmp_path / "run/recipe.yaml").read_text()
    assert "normalization: mean" in recipe_saved
    assert res.step == 6
    with torch.no_grad():  # the saved model is the trained one, not the original
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                               load_model(str(tiny_dir))[0].model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("sweep", ["[0.0, 0.01, 0.02]", "[0.02, 0.05]"])
def test_sweep_measures_the_trained_t_once_and_final_is_the_saved_model(
        tiny_dir, text_file, tmp_path, monkeypatch, sweep):
    """The trained model's measurement is the sweep's point at its trained t, and the final row
    is the sweep's point at the chosen t: neither is measured twice, and both equal what the
    saved model measures afresh."""
    from prosparse import load_model
    from prosparse.measure import threshold as threshold_mod
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.training.data import heldout_blocks

    calls = []
    real = threshold_mod.evaluate_heldout
    monkeypatch.setattr(threshold_mod, "evaluate_heldout",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, "threshold.value=null", f"threshold.sweep={sweep}",
                      "threshold.train=0.01", "threshold.train_start=3", "threshold.train_ramp=1",
                      "threshold.tolerance=1.0"), tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run/report.json").read_text())
    rows = {r["t"]: r for r in report["threshold_sweep"]["thresholds"]}
    assert len(calls) == len(rows | {0.01: None}) - 1  # every t but the trained one
    assert report["threshold_sweep"]["baseline_perplexity"] == report["trained"]["perplexity"]
    t = report["threshold"]
    assert t in rows and t != 0.01  # a generous tolerance: the largest t of the sweep
    assert report["final"]["perplexity"] == rows[t]["perplexity"]
    model, tok = load_model(str(tmp_path / "run/final"))
    fresh = evaluate_heldout(model, heldout_blocks(tok, [str(text_file)], 32, 128))
    assert fresh["perplexity"] == pytest.approx(report["final"]["perplexity"], rel=1e-5)
    assert fresh["average_sparsity"] == pytest.approx(report["final"]["average_sparsity"])


def test_freeze_keeps_named_parameters(tiny_dir, text_file, tmp_path):
    from prosparse import load_model

    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, "optim.freeze=[down_proj]", "optim.train_params=ffn",
                      "log.measure_before=false"), tmp_path / "run", progress=False)
    before, _ = load_model(str(tiny_dir))
    after, _ = load_model(str(tmp_path / "run/final"))
    mlp0, mlp1 = before.model.layers[0].mlp, after.model.layers[0].mlp
    assert torch.equal(mlp0.down_proj.weight, mlp1.down_proj.weight)
    assert not torch.equal(mlp0.up_proj.weight, mlp1.up_proj.weight)
    assert torch.equal(before.model.layers[0].self_attn.q_proj.weight,
                       after.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.slow  # lm-eval run inside the report
def test_report_includes_a_small_benchmark(tiny_dir, text_file, tmp_path):
    """eval.tasks runs lm-eval on the original and the final model (issue 7: in the report)."""
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, "eval.tasks=[piqa]", "eval.limit=2"), tmp_path / "run",
          progress=False)
    report = json.loads((tmp_path / "run/report.json").read_text())
    for key in ("original", "final"):
        piqa = report["benchmarks"][key]["tasks"]["piqa"]
        assert piqa["n"] == 2 and 0 <= piqa["value"] <= 1
    assert "piqa" in report["benchmark_table"]
    assert report["benchmark_table"] in (tmp_path / "run/table.md").read_text()
    with pytest.raises(ValueError, match=r"eval.limit \(0\) must be a positive number"):
        tiny_recipe(tiny_dir, text_file, "eval.tasks=[piqa]", "eval.limit=0").validate()


def test_sft_on_chat_data(tiny_dir, text_file, tmp_path):
    """data.format=chat: the run trains on templated conversations, loss on answers only."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tiny_dir)
    conv = [{"role": "user", "content": "say alpha"}, {"role": "assistant", "content": "alpha"}]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"messages": conv}) for _ in range(80)))
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, f"data.sources=[{sft}]", "data.format=chat",
                      "log.measure_before=false"), tmp_path / "run", progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and all(m["lm_loss"] > 0 for m in metrics)
    with pytest.raises(KeyError, match="unknown data.format 'sft'; choose one of text, chat"):
        tiny_recipe(tiny_dir, text_file, "data.format=sft").validate()


def test_divergence_stops_the_run_and_keeps_only_finite_checkpoints(tiny_dir, text_file,
                                                                    tmp_path):
    from safetensors.torch import load_file

    from prosparse.training.loop import TrainingDiverged

    _reset_accelerate()
    recipe = tiny_recipe(tiny_dir, text_file, "optim.lr=1e30", "optim.grad_clip=0",
                         "checkpoint.every=1", "checkpoint.keep=10")
    with pytest.raises(TrainingDiverged, match=r"diverged (at|by) step \d+.*optim.lr 1e\+30.*"
                                                r"optim.grad_clip"):
        train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run/final").exists() and not (tmp_path / "run/report.json").exists()
    for ck in sorted((tmp_path / "run/checkpoints").glob("step-*")):
        for f in (ck / "model").glob("*.safetensors"):
            for name, t in load_file(f).items():
                assert torch.isfinite(t).all(), f"{ck.name} {name} holds NaN/inf"


def test_a_loss_that_explodes_is_a_warning_in_the_report(tiny_dir, text_file, tmp_path):
    _reset_accelerate()
    recipe = tiny_recipe(tiny_dir, text_file, "optim.lr=1e3", "optim.warmup_steps=0",
                         "stages=[{lambda: 0, steps: 24}]", "log.eval_every=0")
    res = train(recipe, tmp_path / "run", progress=False)
    assert any("climbed" in w or "near the vocabulary" in w for w in res.report["warnings"]), \
        res.report.get("warnings")
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert report["warnings"] == res.report["warnings"]


@pytest.mark.parametrize("override,message", [
    ("data.heldout=[/no/such/corpus.txt]", "no data at '/no/such/corpus.txt'"),
    ("eval.tasks=[no_such_task]", "eval.tasks"),
    ("threshold.sweep=[]", "threshold.sweep is empty"),
    ("data.format=chat", "has no chat template"),  # known only once the tokenizer is loaded
])
def test_refused_before_step_one_leaves_no_run_folder(tiny_dir, text_file, tmp_path, override,
                                                      message):
    from prosparse.core.errors import UsageError

    _reset_accelerate()
    with pytest.raises(UsageError, match=message):
        train(tiny_recipe(tiny_dir, text_file, override, "threshold.value=null"),
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    _reset_accelerate()  # the corrected command just works
    train(tiny_recipe(tiny_dir, text_file, "stages=[{lambda: 0, steps: 1}]"), tmp_path / "run",
          progress=False)
    assert (tmp_path / "run/report.json").is_file()


def test_convert_then_train_distils_from_the_original_and_so_does_a_second_recipe(
        tiny_dir, text_file, tmp_path):
    import json as _json

    from prosparse import load_model, relufy_, save_model
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.training.data import heldout_blocks

    silu, tok = load_model(str(tiny_dir))
    blocks = heldout_blocks(tok, [str(text_file)], 32, 128)
    want = evaluate_heldout(silu, blocks)["perplexity"]  # the SiLU original, independently
    relufy_(silu, "fatrelu", 0.01)  # what `prosparse convert` does
    save_model(silu, tok, tmp_path / "converted")
    assert _json.loads((tmp_path / "converted/config.json").read_text())[
        "prosparse_original_act"] == "silu"

    _reset_accelerate()
    first = train(tiny_recipe(tiny_dir, text_file, f"model={tmp_path / 'converted'}",
                              "distill.weight=0.5"), tmp_path / "run1", progress=False).report
    assert first["original"]["perplexity"] == pytest.approx(want, rel=1e-6)
    assert first["original"]["average_sparsity"] == 0.0  # SiLU, not the ReLU model
    assert "original (SiLU)" in first["table"]
    final = _json.loads((tmp_path / "run1/final/config.json").read_text())
    assert final["prosparse_trained_from"] == str(tmp_path / "converted")

    _reset_accelerate()  # a second recipe on the trained checkpoint: the same original
    second = train(tiny_recipe(tiny_dir, text_file, f"model={tmp_path / 'run1/final'}",
                               "distill.weight=0.5"), tmp_path / "run2", progress=False).report
    assert second["original"]["perplexity"] == pytest.approx(want, rel=1e-6)


def test_a_relu_model_with_no_original_needs_a_named_teacher(tiny_dir, text_file, tmp_path):
    import json as _json

    from prosparse import load_model, relufy_, save_model
    from prosparse.core.errors import UsageError

    model, tok = load_model(str(tiny_dir))
    relufy_(model, "relu")
    save_model(model, tok, tmp_path / "relu")
    cfg = _json.loads((tmp_path / "relu/config.json").read_text())
    cfg.pop("prosparse_original_act")  # a ReLU model from elsewhere: nothing recorded
    (tmp_path / "relu/config.json").write_text(_json.dumps(cfg))
    _reset_accelerate()
    with pytest.raises(UsageError, match="records no original model.*distill.teacher"):
        train(tiny_recipe(tiny_dir, text_file, f"model={tmp_path / 'relu'}",
                          "distill.weight=0.5"), tmp_path / "run", progress=False)
    _reset_accelerate()
    with pytest.raises(UsageError, match="records no original model.*reference trained"):
        train(tiny_recipe(tiny_dir, text_file, f"model={tmp_path / 'relu'}",
                          "threshold.reference=original"), tmp_path / "ref", progress=False)
    assert not (tmp_path / "ref/metrics.jsonl").exists()  # refused before any training
    _reset_accelerate()
    plain = train(tiny_recipe(tiny_dir, text_file, f"model={tmp_path / 'relu'}"),
                  tmp_path / "plain", progress=False).report
    assert "original" not in plain and "starting checkpoint" in plain["table"]
    _reset_accelerate()
    named = train(tiny_recipe(tiny_dir, text_file, f"model={tmp_path / 'relu'}",
                              "distill.weight=0.5", f"distill.teacher={tiny_dir}"),
                  tmp_path / "named", progress=False).report
    assert named["original"]["average_sparsity"] == 0.0


def test_a_drelu_recipe_trains_and_ends_drelu_with_its_threshold(tiny_dir, text_file, tmp_path):
    from prosparse import load_model
    from prosparse.models.relufy import current_activation

    _reset_accelerate()
    res = train(tiny_recipe(tiny_dir, text_file, "activation=drelu", "threshold.train=0.02",
                            "threshold.train_start=3", "threshold.train_ramp=2"),
                tmp_path / "run", progress=False)
    assert res.report["threshold"] == 0.01
    model, _ = load_model(str(tmp_path / "run/final"))
    assert current_activation(model) == ("drelu", 0.01)
    assert res.report["final"]["average_sparsity"] > res.report["original"]["average_sparsity"]


def test_per_layer_thresholds_as_the_recipe_deploys_them(tiny_dir, text_file, tmp_path):
    from prosparse import load_model
    from prosparse.models.relufy import current_activation

    _reset_accelerate()
    res = train(tiny_recipe(tiny_dir, text_file, "threshold.value=null",
                            "threshold.per_layer=true", "threshold.tolerance=0.05"),
                tmp_path / "run", progress=False)
    ts = res.report["threshold"]
    assert isinstance(ts, list) and len(ts) == 2
    assert "t per layer" in res.report["table"]
    model, _ = load_model(str(tmp_path / "run/final"))
    act, params = current_activation(model)
    assert act in ("fatrelu", "relu") and (params == pytest.approx(ts) or max(ts) == 0)


def test_thresholds_judged_against_the_original_model(tiny_dir, text_file, tmp_path):
    """threshold.reference original: the final thresholds are searched against the original
    model's held-out perplexity, measured again by a resumed run (whose report starts empty),
    and the report says which."""
    from prosparse import load_model
    from prosparse.core.errors import UsageError
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.measure.sparsity import heldout_sets

    recipe = tiny_recipe(tiny_dir, text_file, "threshold.value=null", "threshold.per_layer=true",
                         "threshold.tolerance=0.5", "threshold.reference=original")
    _reset_accelerate()
    train(recipe, tmp_path / "run", stop_after=3, progress=False)
    _reset_accelerate()
    r = train(recipe, tmp_path / "run", resume=True, progress=False).report
    original, tok = load_model(str(tiny_dir))
    want = evaluate_heldout(original, heldout_sets(tok, [str(text_file)], 128, 32))["perplexity"]
    chosen = r["threshold_per_layer"]
    assert r["original"]["perplexity"] == pytest.approx(want, rel=1e-5)
    assert chosen["reference_perplexity"] == r["original"]["perplexity"]
    assert chosen["within_tolerance"] == (
        r["final"]["perplexity"] <= 1.5 * r["original"]["perplexity"] + 1e-9)
    assert r["threshold"] == chosen["layer_thresholds"]
    with pytest.raises(UsageError, match="threshold.reference 'model'"):
        tiny_recipe(tiny_dir, text_file, "threshold.reference=model")


def test_dead_neurons_get_their_gate_drawn_again(tiny_dir, text_file, tmp_path):
    """A threshold far above every gate leaves the FFNs dead; optim.reinit_dead_every redraws
    their gate rows at the layer's scale and zero their down-projection columns (the counts are
    in the metrics)."""
    from prosparse import load_model

    _reset_accelerate()
    recipe = tiny_recipe(tiny_dir, text_file, "activation=fatrelu", "activation_param=50",
                         "optim.reinit_dead_every=2", "stages=[{lambda: 0, steps: 4}]",
                         "threshold.value=0")
    train(recipe, tmp_path / "run", stop_after=2, progress=False)
    m = read_metrics(tmp_path / "run")
    assert "reinit_dead" not in m[0] and m[1]["reinit_dead"] > 0
    before = load_model(str(tiny_dir))[0].model.layers[0].mlp.gate_proj.weight.detach()
    after = load_model(str(tmp_path / "run/checkpoints/step-000002/model"))[0] \
        .model.layers[0].mlp.gate_proj.weight.detach()
    changed = (after - before).abs().amax(dim=1) > 1e-3  # redrawn rows move far more than lr
    assert changed.float().mean() > 0.5
    assert float(after.pow(2).mean().sqrt()) == pytest.approx(
        float(before.pow(2).mean().sqrt()), rel=0.5)
    # a revived neuron starts with no output: its down-projection column is zero
    down = load_model(str(tmp_path / "run/checkpoints/step-000002/model"))[0] \
        .model.layers[0].mlp.down_proj.weight.detach()
    assert torch.equal((down == 0).all(dim=0), changed)
