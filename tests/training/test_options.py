"""Recipe options of the loop: activation annealing (a pure ramp, resumed exactly, the model
exactly ReLU when it ends), threshold-aware training (a FATReLU ramp at the end) and a pruned
model's zero weights kept through training."""

import pytest
import torch

from prosparse.core.errors import UsageError
from prosparse.training import read_metrics, train
from tests.training.test_loop import _reset_accelerate, tiny_recipe


def test_anneal_ramp_is_logged_and_ends_exactly_relu(tiny_dir, text_file, tmp_path):
    from prosparse import find_gated_ffns, load_model

    recipe = tiny_recipe(tiny_dir, text_file, "anneal.steps=2", "threshold.value=0")
    _reset_accelerate()
    res = train(recipe, tmp_path / "run", progress=False)
    metrics = read_metrics(tmp_path / "run")
    assert [m["anneal"] for m in metrics] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    model, _ = load_model(str(res.run / "final"))
    assert all(isinstance(f.act, torch.nn.ReLU) for f in find_gated_ffns(model))
    assert model.config.hidden_act == "relu"


def test_annealed_run_resumes_exactly(tiny_dir, text_file, tmp_path):
    recipe = tiny_recipe(tiny_dir, text_file, "anneal.steps=2", "anneal.shape=cosine",
                         "stages=[{lambda: 0, steps: 3}, {lambda: 0.5, steps: 5}]")
    _reset_accelerate()
    train(recipe, tmp_path / "full", progress=False)
    _reset_accelerate()
    train(recipe, tmp_path / "part", stop_after=1, progress=False)  # inside the ramp
    _reset_accelerate()
    train(recipe, tmp_path / "part", resume=True, progress=False)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    for x, y in zip(a, b):
        for key in ("anneal", "lm_loss", "loss", "train_sparsity"):
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]} vs {y[key]}"


def test_anneal_must_end_before_l1(tiny_dir, text_file):
    with pytest.raises(UsageError, match="anneal.steps"):
        tiny_recipe(tiny_dir, text_file, "anneal.steps=3")  # lambda > 0 from step 3


@pytest.mark.parametrize("keep", [None, False])
def test_pruned_zeros_stay_zero(tiny_dir, text_file, tmp_path, keep):
    from transformers import AutoModelForCausalLM

    from prosparse.pruning import nm_mask, prunable_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for lin in prunable_linears(model).values():
            lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    model.config.prosparse_pruning = {"method": "magnitude", "pattern": "2:4"}
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    for f in tiny_dir.glob("*token*"):  # the tokenizer's files
        (pruned / f.name).write_bytes(f.read_bytes())
    extra = [] if keep is None else [f"weights.keep_mask={str(keep).lower()}"]
    _reset_accelerate()
    res = train(tiny_recipe(pruned, text_file, *extra), tmp_path / "run", progress=False)
    after = AutoModelForCausalLM.from_pretrained(res.run / "final")
    trained = prunable_linears(after)
    kept = all(bool((trained[n].weight[lin.weight == 0] == 0).all())
               for n, lin in prunable_linears(model).items())
    assert kept == (keep is None)  # on by default for a model that carries a mask
    if keep is None:
        assert res.report["weights"]["keep_mask"] is True


def test_fit_lambda_reads_finished_runs(tiny_dir, text_file, tmp_path, capsys):
    from prosparse.cli import main
    from prosparse.cli.train import run_point

    runs = []
    for lam in (0.5, 2.0):
        _reset_accelerate()
        res = train(tiny_recipe(tiny_dir, text_file, f"stages.2.lambda={lam}"),
                    tmp_path / f"r{lam}", progress=False)
        runs.append(res)
        point = run_point(res.run)
        assert point == (lam, pytest.approx(100 * res.report["trained"]["average_sparsity"]))
    assert main(["fit-lambda", "--run", str(runs[0].run), "--run", str(runs[1].run),
                 "--target", "99"]) == 0
    out = capsys.readouterr().out
    assert "lambda_S 0.5" in out and "your points" in out and "target 99%" in out
    assert main(["fit-lambda", "--run", str(tmp_path)]) == 2  # not a run folder
    assert main(["fit-lambda", "--point", "abc"]) == 2


def test_fused_adamw_matches_the_per_tensor_loop(tiny_dir, text_file, tmp_path):
    """optim.fused (the default wherever torch has the kernel) trains to the same losses as the
    per-tensor AdamW loop, within float rounding, and logs each step's wall time."""
    runs = {}
    for fused in ("true", "false"):
        recipe = tiny_recipe(tiny_dir, text_file, f"optim.fused={fused}")
        _reset_accelerate()
        train(recipe, tmp_path / fused, progress=False)
        runs[fused] = read_metrics(tmp_path / fused)
    for x, y in zip(runs["true"], runs["false"]):
        for key in ("lm_loss", "penalty", "loss", "train_sparsity"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (
                f"step {x['step']} {key}: fused {x[key]} vs loop {y[key]}")
        assert x["step_seconds"] > 0
    assert runs["true"][-1]["lm_loss"] != runs["true"][0]["lm_loss"]  # it did train


def test_fused_adamw_choice():
    from prosparse.training.loop import use_fused_adamw

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert use_fused_adamw(cpu, None) is True
    assert use_fused_adamw(cpu, False) is None  # torch's own per-tensor default
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert use_fused_adamw(meta, None) is None
    with pytest.raises(UsageError, match="optim.fused"):
        use_fused_adamw(meta, True)


@pytest.mark.parametrize("flags,speedup,cuda,want", [
    ({"avx2", "fma"}, 2.0, False, "no"),            # AVX2 only: bf16 is emulated, fp32 it is
    ({"avx512f", "avx512_bf16"}, 1.6, False, "bf16"),
    ({"avx512f", "avx512_bf16"}, 0.6, False, "no"),  # native bf16 that measures slower
    ({"amx_bf16", "amx_tile"}, 1.6, False, "bf16"),
    (set(), 0.6, True, "bf16"),                     # CUDA
])
def test_dtype_auto_is_bf16_where_the_hardware_makes_it_faster(monkeypatch, flags, speedup,
                                                                cuda, want):
    from prosparse.kernels import fused
    from prosparse.training import loop
    from prosparse.training.recipe import load_recipe

    monkeypatch.setattr(fused, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(loop, "bf16_matmul_speedup", lambda: speedup)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    auto = load_recipe(None, ["model=smollm2-135m"])
    assert auto.dtype == "auto"
    assert loop._mixed_precision(auto) == want
    pinned = {d: load_recipe(None, ["model=smollm2-135m", f"dtype={d}"]) for d in ("fp32", "bf16")}
    assert loop._mixed_precision(pinned["fp32"]) == "no"
    assert loop._mixed_precision(pinned["bf16"]) == "bf16"


@pytest.mark.parametrize("flags,want", [({"avx512_bf16"}, "no"), ({"avx512_bf16", "amx_bf16"},
                                                                   "bf16")])
def test_dtype_auto_goes_by_the_flags_in_a_multi_process_run(monkeypatch, flags, want):
    """Processes of one run must agree on the precision, so they do not time it each."""
    from prosparse.kernels import fused
    from prosparse.training import loop
    from prosparse.training.recipe import load_recipe

    def no_timing():
        raise AssertionError("timed in a multi-process run")

    monkeypatch.setattr(fused, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(loop, "bf16_matmul_speedup", no_timing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert loop._mixed_precision(load_recipe(None, ["model=smollm2-135m"])) == want


def test_bf16_matmul_speedup_is_a_positive_ratio():
    from prosparse.training.loop import bf16_matmul_speedup

    r = bf16_matmul_speedup.__wrapped__(reps=2)
    assert 0 < r < 1000


def test_report_records_the_chosen_precision(tiny_dir, text_file, tmp_path):
    _reset_accelerate()
    r = train(tiny_recipe(tiny_dir, text_file), tmp_path / "r", progress=False)
    assert r.report["mixed_precision"] == "no"  # tiny_recipe pins dtype=fp32


def test_bf16_autocast_trains_to_the_fp32_losses(tiny_dir, text_file, tmp_path):
    """dtype=bf16 (what `auto` picks on AVX512-BF16/AMX CPUs and CUDA) follows the fp32 eager
    run's losses within bf16 rounding, and the report says which precision ran."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        _reset_accelerate()
        r = train(tiny_recipe(tiny_dir, text_file, f"dtype={dtype}"), tmp_path / dtype,
                  progress=False)
        assert r.report["mixed_precision"] == {"fp32": "no", "bf16": "bf16"}[dtype]
        runs[dtype] = read_metrics(tmp_path / dtype)
    assert len(runs["bf16"]) == len(runs["fp32"]) == 6
    for x, y in zip(runs["bf16"], runs["fp32"]):
        # bf16 keeps 8 bits of mantissa (~0.4%); six steps of AdamW compound it a little
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=0.03), x["step"]
        assert x["train_sparsity"] == pytest.approx(y["train_sparsity"], abs=0.05), x["step"]
    assert runs["bf16"][0]["lm_loss"] != runs["fp32"][0]["lm_loss"]  # it did run in bf16


def test_hidden_loss_is_relative_squared_error_per_layer():
    from prosparse.training.loop import hidden_loss

    t = (torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0))
    assert float(hidden_loss(t, t)) == 0.0
    s = (torch.zeros(2, 3, 4), torch.full((2, 3, 4), 3.0), torch.zeros(2, 3, 4))
    # layer 1: (3 - 2)^2 / 2^2 = 0.25; layer 2: 1^2 / 1^2 = 1; embeddings (index 0) left out
    assert float(hidden_loss(s, t)) == pytest.approx((0.25 + 1.0) / 2)


def test_hidden_matching_needs_the_teacher(tiny_dir, text_file):
    with pytest.raises(UsageError, match="distill.weight > 0"):
        tiny_recipe(tiny_dir, text_file, "distill.hidden_weight=1.0", "distill.weight=0")


def test_hidden_matching_is_logged_and_trains(tiny_dir, text_file, tmp_path):
    _reset_accelerate()
    base = train(tiny_recipe(tiny_dir, text_file, "distill.weight=1.0"), tmp_path / "kd",
                 progress=False)
    _reset_accelerate()
    hid = train(tiny_recipe(tiny_dir, text_file, "distill.weight=1.0",
                            "distill.hidden_weight=2.0"), tmp_path / "hid", progress=False)
    a, b = read_metrics(base.run), read_metrics(hid.run)
    assert "hidden_loss" not in a[0]
    # step 1: the same model and batch, so the objective differs by exactly the weighted term
    assert b[0]["hidden_loss"] > 0
    assert b[0]["loss"] == pytest.approx(a[0]["loss"] + 2.0 * b[0]["hidden_loss"], rel=1e-5)
    assert all(m["hidden_loss"] > 0 for m in b)
    assert b[-1]["lm_loss"] != a[-1]["lm_loss"]  # the term moved the weights


def test_lm_loss_ignores_the_last_position_as_slicing_did():
    import torch.nn.functional as F

    from prosparse.training.loop import lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 17, generator=g)
    ids = torch.randint(0, 17, (2, 9), generator=g)
    sliced = F.cross_entropy(logits[:, :-1].reshape(-1, 17), ids[:, 1:].reshape(-1))
    assert torch.allclose(lm_loss(logits, ids), sliced, rtol=1e-6)
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, 4:] = 1
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 17), ids[:, 1:].reshape(-1), reduction="none")
    keep = mask[:, 1:].reshape(-1).float()
    assert torch.allclose(lm_loss(logits, ids, mask), (nll * keep).sum() / keep.sum(), rtol=1e-6)
    assert float(lm_loss(logits, ids, torch.zeros_like(mask))) == 0.0


def test_bf16_teacher_linears_give_autocasts_logits_bit_for_bit():
    import copy

    from prosparse.training.loop import bf16_teacher_linears_
    from tests.conftest import tiny_llama

    model = tiny_llama().eval().requires_grad_(False)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    teacher = copy.deepcopy(model)
    n = bf16_teacher_linears_(teacher)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert teacher.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays
    assert teacher.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        got = teacher(input_ids=ids).logits
    assert torch.equal(got, want)


# --- threshold-aware training: FATReLU t ramped in at the end of training ------------------------

def test_train_threshold_first_middle_last():
    from prosparse.sparsity import train_threshold

    assert train_threshold(480, 0.3, 480, 60) == 0.0  # up to the start: the base
    assert train_threshold(481, 0.3, 480, 60) == pytest.approx(0.3 / 60)
    assert train_threshold(510, 0.3, 480, 60) == pytest.approx(0.15)
    assert train_threshold(540, 0.3, 480, 60) == 0.3 and train_threshold(600, 0.3, 480, 60) == 0.3
    values = [train_threshold(s, 0.3, 480, 60) for s in range(1, 601)]
    assert values == sorted(values)  # never decreases
    assert train_threshold(481, 0.3, 480, 0) == 0.3  # no ramp: the full threshold at once
    assert train_threshold(5, 0.3, 4, 2, base=0.1) == pytest.approx(0.2)  # from a fatrelu base


def test_threshold_ramp_is_trained_under_logged_and_resumed(tiny_dir, text_file, tmp_path):
    t = "threshold.train=0.05", "threshold.train_start=2", "threshold.train_ramp=2"
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file), tmp_path / "plain", progress=False)
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, *t), tmp_path / "full", progress=False)
    plain, full = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "full")
    assert [m["threshold"] for m in full] == pytest.approx([0, 0, 0.025, 0.05, 0.05, 0.05])
    assert "threshold" not in plain[0]
    for x, y in zip(plain[:2], full[:2]):  # threshold 0: the same ReLU model
        assert x["loss"] == y["loss"]
    # from step 3 the FFNs run FATReLU: more exact zeros than the plain run, a different loss
    assert full[2]["train_sparsity"] > plain[2]["train_sparsity"]
    assert full[2]["loss"] != plain[2]["loss"]
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, *t), tmp_path / "part", stop_after=3,
          progress=False)  # inside the ramp
    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file, *t), tmp_path / "part", resume=True, progress=False)
    for x, y in zip(full, read_metrics(tmp_path / "part")):
        for key in ("threshold", "lm_loss", "loss", "train_sparsity"):
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]} vs {y[key]}"


@pytest.mark.parametrize("extra,match", [
    (["threshold.train_start=5", "threshold.train_ramp=2"], "runs past the last step"),
    (["activation=shifted_relu"], "needs activation relu or fatrelu"),
    (["activation=fatrelu", "activation_param=0.2"], "below activation_param"),
    (["anneal.steps=2", "threshold.train_start=1"], "inside the activation annealing ramp"),
])
def test_threshold_ramp_refuses_bad_recipes(tiny_dir, text_file, extra, match):
    with pytest.raises(UsageError, match=match):
        tiny_recipe(tiny_dir, text_file, "threshold.train=0.1", *extra)


def test_final_benchmark_scores_the_model_as_the_original_was_and_final_loads(
        tiny_dir, text_file, tmp_path, monkeypatch):
    """Under dtype=bf16 the trained model runs inside accelerate's autocast wrapper; the report's
    lm-eval of the final model must not (the original was scored in fp32, before prepare, and
    final/ loads in fp32): bf16 scoring read run 3's lm-eval 2.6 points low."""
    from prosparse.training import loop, report

    seen = []

    def fake_benchmark(model, tokenizer, recipe):
        # accelerate's wrapper casts outputs back to fp32, so look inside: is autocast on
        # while the layers run?
        state = []
        hook = model.lm_head.register_forward_pre_hook(
            lambda mod, args: state.append(torch.is_autocast_enabled("cpu")))
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        hook.remove()
        seen.append(state)
        return {"tasks": {}, "groups": {}, "average": 0.0}

    monkeypatch.setattr(loop, "benchmark", fake_benchmark)
    monkeypatch.setattr(report, "benchmark", fake_benchmark)
    _reset_accelerate()
    r = train(tiny_recipe(tiny_dir, text_file, "dtype=bf16", "eval.tasks=[piqa]", "eval.limit=2"),
              tmp_path / "bf16", progress=False)
    assert r.report["mixed_precision"] == "bf16"
    assert set(r.report["benchmarks"]) == {"original", "final"}
    assert seen == [[False], [False]]  # the original, then the final model
