"""Recipes: YAML + dotted overrides, unknown keys and bad values named."""

import pytest

from prosparse.core.config import apply_overrides
from prosparse.training.recipe import dump_recipe, load_recipe, recipe_from_dict


def test_dotted_overrides_reach_lists_and_nested_keys():
    r = load_recipe("configs/llama2-7b.yaml", ["stages.4.lambda=0.1", "optim.lr=1e-4",
                                               "data.sources=[wiki, qa]", "stages.5.lambda=0.1"])
    assert r.stages[4].lam == 0.1 and r.optim.lr == 1e-4 and r.data.sources == ["wiki", "qa"]


def test_every_config_loads_and_round_trips():
    import glob

    import yaml

    for path in sorted(glob.glob("configs/*.yaml")):
        first = open(path).readline()
        assert first.startswith("# prosparse "), f"{path} must open with the command to run it"
        if first.split()[2] not in ("train", "demo"):
            continue  # another command's config (prosparse prune --config)
        r = load_recipe(path)
        assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_errors_name_the_setting():
    with pytest.raises(KeyError, match=r"unknown recipe key 'optim.lrr'; choose one of lr"):
        load_recipe("configs/demo.yaml", ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"stages\[1\].lambda .* must be >= stages\[0\]"):
        load_recipe("configs/fixed-l1.yaml", ["stages.1.lambda=-0.0", "stages.0.lambda=0.1"])
    with pytest.raises(KeyError, match="stages.9 is not an index"):
        apply_overrides({"stages": [{}]}, ["stages.9.lambda=1"])
    with pytest.raises(KeyError, match="unknown penalty.normalization 'l2'"):
        load_recipe(None, ["penalty.normalization=l2"])
    with pytest.raises(ValueError, match="must look like KEY=VALUE"):
        load_recipe(None, ["optim.lr"])
    # CATS is calibrated per layer by convert; a recipe would make it one threshold and then
    # replace its SiLU with FATReLU at the end
    with pytest.raises(ValueError, match="activation: cats is training-free.*prosparse convert"):
        load_recipe("configs/demo.yaml", ["activation=cats", "activation_param=0.5"])
