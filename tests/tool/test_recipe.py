"""Recipe schema: defaults, and every kind of mistake as one precise error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.tool.recipe import SCHEMAS, load_recipe, validate

MINIMAL = {"stages": [{"type": "unstructured", "sparsity": 0.5}]}


def test_defaults_are_filled_in():
    recipe = validate(MINIMAL)
    assert recipe["version"] == 1 and recipe["ignore"] == [] and recipe["calibration"] is None
    stage = recipe["stages"][0]
    assert stage == {"type": "unstructured", "sparsity": 0.5,
                     "schedule": {"kind": "cubic", "steps": 1}, "block": [1, 1],
                     "zeros_per_block": None, "layers": ["Linear", "Conv1d", "Conv2d", "Conv3d"],
                     "ignore": []}


def test_full_recipe_from_yaml(tmp_path):
    file = tmp_path / "r.yaml"
    file.write_text(
        "input_shape: [1, 1, 8, 8]\nignore: [classifier.3]\n"
        "calibration: {file: c.safetensors, batches: 2}\n"
        "stages:\n  - {type: unstructured, sparsity: 0.9, schedule: {steps: 10}}\n"
        "  - {type: structured, ratio: 0.5, importance: l1}\n"
        "  - {type: oneshot, sparsity: 0.5}\n"
    )
    recipe = load_recipe(file)
    assert recipe["calibration"] == {"file": "c.safetensors", "key": "inputs", "batches": 2,
                                     "batch_size": 1}
    assert [s["type"] for s in recipe["stages"]] == ["unstructured", "structured", "oneshot"]
    assert recipe["stages"][0]["schedule"] == {"kind": "cubic", "steps": 10}
    assert recipe["stages"][2]["method"] == "sparsegpt"


@pytest.mark.parametrize(("recipe", "message"), [
    ({**MINIMAL, "stagez": 1},
     "recipe: unknown key 'stagez'; valid keys: calibration, ignore, input_dtype, input_shape, "
     "seed, stages, version"),
    ({"stages": [{"type": "unstructured", "sparsty": 0.5}]},
     "recipe.stages[0]: unknown key 'sparsty'; valid keys: block, ignore, layers, schedule, "
     "sparsity, type, zeros_per_block"),
    ({"stages": [{"type": "unstructured", "sparsity": 0.5, "schedule": {"step": 3}}]},
     "recipe.stages[0].schedule: unknown key 'step'; valid keys: kind, steps"),
    ({**MINIMAL, "calibration": {"file": "x", "bacthes": 2}},
     "recipe.calibration: unknown key 'bacthes'; valid keys: batch_size, batches, file, key"),
])
def test_unknown_keys_list_the_valid_ones(recipe, message):
    with pytest.raises(ConfigError) as info:
        validate(recipe)
    assert str(info.value) == message


@pytest.mark.parametrize(("recipe", "error", "message"), [
    ({"stages": [{"type": "unstructured", "sparsity": 1.5}]}, ConfigError,
     r"recipe.stages\[0\].sparsity: expected a value in \[0.0, 1.0\], got 1.5"),
    ({"stages": [{"type": "unstructured", "sparsity": "high"}]}, ConfigTypeError,
     r"recipe.stages\[0\].sparsity: expected a number, got str 'high'"),
    ({"stages": [{"type": "unstructured", "sparsity": True}]}, ConfigTypeError,
     r"expected a number, got bool True"),
    ({"stages": [{"type": "structured", "ratio": 1.0}]}, ConfigError,
     r"recipe.stages\[0\].ratio: expected a value in \[0.0, 0.99\], got 1.0"),
    ({"stages": [{"type": "structured"}]}, ConfigError,
     r"recipe.stages\[0\]: missing required key 'ratio'"),
    ({"stages": [{"type": "lottery", "sparsity": 0.5}]}, ConfigError,
     r"recipe.stages\[0\].type: expected one of \['unstructured', 'structured', 'oneshot'\], "
     r"got 'lottery'"),
    ({"stages": []}, ConfigError, r"recipe.stages: expected a non-empty list of stages"),
    ({}, ConfigError, r"recipe: missing required key 'stages'"),
    ([1, 2], ConfigTypeError, r"recipe: expected a mapping, got list"),
    ({**MINIMAL, "input_shape": [1, 0]}, ConfigError,
     r"recipe.input_shape\[1\]: expected a value in \[1, inf\], got 0"),
    ({**MINIMAL, "input_shape": "1,3"}, ConfigTypeError, r"recipe.input_shape: expected a list"),
    ({"stages": [{"type": "unstructured", "sparsity": 0.5, "layers": ["LSTM"]}]}, ConfigError,
     r"recipe.stages\[0\].layers\[0\]: expected one of \['Linear', 'Conv1d', 'Conv2d', "
     r"'Conv3d'\], got 'LSTM'"),
    ({"stages": [{"type": "oneshot", "sparsity": 0.5}]}, ConfigError,
     r"recipe.stages\[0\]: a oneshot stage needs calibration data"),
    ({**MINIMAL, "version": 2}, ConfigError, r"recipe.version: expected one of \[1\], got 2"),
])
def test_wrong_values_name_path_value_and_expectation(recipe, error, message):
    with pytest.raises(error, match=message):
        validate(recipe)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe '.*missing.yaml': cannot read it"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {type: unstructured\n")
    with pytest.raises(ConfigError, match=r"bad.yaml': not valid YAML at line \d"):
        load_recipe(bad)


def test_python_objects_in_yaml_are_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("stages: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(evil)


@settings(max_examples=40, deadline=None)
@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in SCHEMAS["recipe"]))
def test_any_unknown_top_level_key_is_rejected(key):
    with pytest.raises(ConfigError, match=r"unknown key .*; valid keys: calibration"):
        validate({**MINIMAL, key: 1})
