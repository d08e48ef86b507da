"""relufy_ across model families, found by structure; activation semantics at the boundary."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from prosparse import find_gated_ffns, relufy_
from prosparse.models.activations import (
    FATReLU,
    ShiftedReLU,
    fatrelu,
    make_activation,
    parse_hidden_act,
)

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "smollm3": ("SmolLM3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}


def build(family: str) -> nn.Module:
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def ffn_reference(ffn, x: torch.Tensor, act) -> torch.Tensor:
    """The gated FFN of facts.md written out: down(act(gate(x)) * up(x))."""
    m = ffn.module
    if ffn.fused:
        g, u = m.gate_up_proj(x).chunk(2, dim=-1)
    else:
        g, u = m.gate_proj(x), m.up_proj(x)
    return m.down_proj(act(g) * u)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_relufy_every_family(family):
    model = build(family)
    ffns = find_gated_ffns(model)
    assert len(ffns) == 2, [f.name for f in ffns]
    changed = relufy_(model, "fatrelu", 0.05)
    assert changed == [f.name for f in ffns]
    x = torch.randn(3, 5, 64)
    for ffn in find_gated_ffns(model):
        assert isinstance(ffn.act, FATReLU)
        want = ffn_reference(ffn, x, lambda g: torch.where(g >= 0.05, g, torch.zeros_like(g)))
        torch.testing.assert_close(ffn.module(x), want, rtol=0, atol=0)
    cfg = getattr(model.config, "text_config", None) or model.config
    act_key = "hidden_activation" if getattr(cfg, "hidden_activation", None) else "hidden_act"
    assert getattr(cfg, act_key) == "fatrelu" and cfg.hidden_act_param == 0.05
    model(input_ids=torch.randint(0, 128, (1, 7)))  # the whole model still runs


@pytest.mark.parametrize("cls_name,cfg_kwargs", [
    ("GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2)),
    ("BertModel", dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37)),
])
def test_model_without_gated_ffn_is_a_clear_error(cls_name, cfg_kwargs):
    model_cls = getattr(transformers, cls_name)
    model = model_cls(model_cls.config_class(**cfg_kwargs))
    with pytest.raises(ValueError, match=f"{cls_name} has no gated FFN: looked for .*gate_proj"):
        relufy_(model)


def test_fatrelu_keeps_values_at_the_threshold():
    t = 0.25
    g = torch.tensor([-1.0, 0.0, 0.2499999, 0.25, 0.2500001, 3.0])
    out = FATReLU(t)(g)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.25, pytest.approx(0.2500001), 3.0]
    for dtype in (torch.float16, torch.bfloat16):
        gd = torch.tensor([0.25, 0.2490], dtype=dtype)
        assert fatrelu(gd, torch.tensor(t, dtype=dtype)).tolist()[0] == 0.25


def test_shifted_relu_and_zero_threshold_is_plain_relu():
    g = torch.linspace(-1, 1, 9)
    assert torch.equal(ShiftedReLU(0.5)(g), torch.relu(g - 0.5))
    model = build("llama")
    relufy_(model, "fatrelu", 0.0)
    assert all(type(f.act) is nn.ReLU for f in find_gated_ffns(model))
    assert model.config.hidden_act == "relu" and not hasattr(model.config, "hidden_act_param")


def test_bad_activation_names_and_values():
    with pytest.raises(KeyError, match="unknown activation 'frelu'; choose one of relu, fatrelu"):
        make_activation("frelu")
    with pytest.raises(ValueError, match="threshold .* must be >= 0"):
        relufy_(build("llama"), act="fatrelu", threshold=-0.1)
    with pytest.raises(ValueError, match="applies to act='fatrelu' only"):
        relufy_(build("llama"), act="relu", threshold=0.1)


def test_parse_hidden_act_forms():
    assert parse_hidden_act("fatrelu", 0.01) == ("fatrelu", 0.01)
    assert parse_hidden_act("fatrelu_0.03") == ("fatrelu", 0.03)
    assert parse_hidden_act("relu") == ("relu", 0.0)
    assert parse_hidden_act("silu") is None
    with pytest.raises(ValueError, match="fatrelu_<number>"):
        parse_hidden_act("fatrelu_abc")


def test_filter_limits_the_swap():
    model = build("llama")
    changed = relufy_(model, act="relu", filter=lambda f: f.name.endswith("0.mlp"))
    assert changed == ["model.layers.0.mlp"]
    acts = [type(f.act).__name__ for f in find_gated_ffns(model)]
    assert acts[0] == "ReLU" and acts[1] != "ReLU"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold_is_cast_to_the_input_dtype(dtype):
    """Kernels follow this rule: t is rounded to the input dtype, then g >= t."""
    t = 0.01
    t_cast = torch.tensor(t).to(dtype)
    g = torch.stack([t_cast, torch.nextafter(t_cast.float(), torch.tensor(0.0)).to(dtype),
                     torch.tensor(0.5, dtype=dtype)])
    out = FATReLU(t)(g)
    assert out[0] == t_cast and out[2] == 0.5
    assert torch.equal(out, fatrelu(g, t_cast))


@torch.no_grad()
def test_drelu_rectifies_gate_and_up_and_loads_back(tmp_path):
    """dReLU (TurboSparse): x1 = fatrelu(gate, t) * relu(up), zero where either factor is;
    saved as hidden_act drelu, restored by load_model, undone by a later swap."""
    import prosparse
    from prosparse.models.activations import RectifiedLinear
    from prosparse.models.relufy import activation_state, current_activation, set_threshold_
    from tests.conftest import char_tokenizer, tiny_llama

    model = tiny_llama()
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    mlp = model.model.layers[0].mlp
    prosparse.relufy_(model, "drelu", 0.05)
    assert isinstance(mlp.up_proj, RectifiedLinear) and current_activation(model) == ("drelu", 0.05)
    g, u = mlp.gate_proj(x), x @ mlp.up_proj.weight.t()
    want = mlp.down_proj(torch.where(g < 0.05, 0.0, g) * torch.relu(u))
    torch.testing.assert_close(mlp(x), want)
    ids = torch.randint(2, 128, (1, 12))
    logits = model(input_ids=ids).logits
    prosparse.save_model(model, char_tokenizer(), tmp_path / "d")
    back, _ = prosparse.load_model(str(tmp_path / "d"))
    assert current_activation(back) == ("drelu", 0.05)
    torch.testing.assert_close(back(input_ids=ids).logits, logits)
    restore = activation_state(back)
    set_threshold_(back, 0.2)  # the threshold moves, the model stays dReLU
    assert current_activation(back) == ("drelu", 0.2)
    restore()
    assert current_activation(back) == ("drelu", 0.05)
    prosparse.relufy_(back, "relu")
    assert type(back.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert current_activation(back) == ("relu", 0.0)


@torch.no_grad()
def test_drelu_runs_exactly_through_the_sparse_ffn():
    import prosparse
    from prosparse.inference import sparsify_
    from tests.conftest import tiny_llama

    model = tiny_llama()
    prosparse.relufy_(model, "drelu")
    ids = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    dense = model(input_ids=ids[:, :1]).logits
    sparsify_(model, backend="cpu", dense_below=0.0)
    torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, dense, rtol=1e-5, atol=1e-5)
