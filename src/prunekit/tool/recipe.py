"""Recipes: the YAML file that tells ``prunekit prune`` what to do, and its schema.

Every key is checked before any work starts: unknown keys are errors that list the valid
ones, and wrong types or out-of-range values name the key path, the value received and
the value expected. ``validate`` returns the recipe with every default filled in, which
is what ``prunekit prune`` writes next to the pruned model.

.. code-block:: yaml

    input_shape: [1, 1, 8, 8]       # example input (MACs, latency, structured capture)
    ignore: [classifier.3]          # layers no stage touches
    calibration: {file: calib.safetensors, key: inputs, batches: 8, batch_size: 4}
    stages:
      - {type: unstructured, sparsity: 0.9, schedule: {steps: 10}}
      - {type: structured, ratio: 0.5, importance: l2}
      - {type: oneshot, method: sparsegpt, sparsity: 0.5}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import ConfigError, ConfigTypeError

__all__ = ["STAGE_TYPES", "load_recipe", "validate"]


@dataclass(frozen=True)
class Field:
    """One key of the schema: its kind, whether it is required, default and range."""

    kind: str  # int | number | str | bool | ints | strs | a nested schema name
    required: bool = False
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None


_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d")
SCHEMAS: dict[str, dict[str, Field]] = {
    "recipe": {
        "version": Field("int", default=1, choices=(1,)),
        "seed": Field("int", default=None),
        "input_shape": Field("ints", low=1),
        "input_dtype": Field("str", default="float32", choices=("float32", "float64", "int64")),
        "ignore": Field("strs", default=[]),
        "calibration": Field("calibration"),
        "stages": Field("stages", required=True),
    },
    "calibration": {
        "file": Field("str", required=True),
        "key": Field("str", default="inputs"),
        "batches": Field("int", default=8, low=1),
        "batch_size": Field("int", default=1, low=1),
    },
    "schedule": {
        "kind": Field("str", default="cubic", choices=("cubic",)),
        "steps": Field("int", default=1, low=1, high=10_000),
    },
    "unstructured": {
        "type": Field("str", required=True),
        "sparsity": Field("number", required=True, low=0.0, high=1.0),
        "schedule": Field("schedule", default={"kind": "cubic", "steps": 1}),
        "block": Field("ints", default=[1, 1], low=1),
        "zeros_per_block": Field("int", default=None, low=0),
        "layers": Field("strs", default=list(_LAYERS), choices=_LAYERS),
        "ignore": Field("strs", default=[]),
    },
    "structured": {
        "type": Field("str", required=True),
        "ratio": Field("number", required=True, low=0.0, high=0.99),
        "importance": Field("str", default=None),
        "ignore": Field("strs", default=[]),
    },
    "oneshot": {
        "type": Field("str", required=True),
        "method": Field("str", default="sparsegpt",
                        choices=("sparsegpt", "admm", "wanda", "magnitude")),
        "sparsity": Field("number", required=True, low=0.0, high=1.0),
        "dense_targets": Field("bool", default=False),
        "exact_update": Field("bool", default=False),
        "offload_folder": Field("str", default=None),
    },
}
STAGE_TYPES = ("unstructured", "structured", "oneshot")


def _type_error(path: str, expected: str, value: Any) -> ConfigTypeError:
    return ConfigTypeError(f"{path}: expected {expected}, got {type(value).__name__} {value!r}")


def _check_range(path: str, field: Field, value: Any) -> None:
    too_low = field.low is not None and value < field.low
    too_high = field.high is not None and value > field.high
    if too_low or too_high:
        low = "-inf" if field.low is None else field.low
        high = "inf" if field.high is None else field.high
        raise ConfigError(f"{path}: expected a value in [{low}, {high}], got {value!r}")
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"{path}: expected one of {list(field.choices)}, got {value!r}")


def _scalar(path: str, field: Field, value: Any) -> Any:
    kind = field.kind
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        raise _type_error(path, {"int": "an integer", "number": "a number", "str": "a string",
                                 "bool": "true or false"}[kind], value)
    if kind != "bool":
        _check_range(path, field, value)
    return float(value) if kind == "number" else value


def _value(path: str, field: Field, value: Any) -> Any:
    if field.kind in ("ints", "strs"):
        if not isinstance(value, list):
            raise _type_error(path, "a list", value)
        item = Field("int" if field.kind == "ints" else "str", low=field.low, high=field.high,
                     choices=field.choices)
        return [_scalar(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if field.kind == "stages":
        return _stages(path, value)
    if field.kind in SCHEMAS:
        return _mapping(path, value, SCHEMAS[field.kind])
    return _scalar(path, field, value)


def _mapping(path: str, value: Any, schema: dict[str, Field]) -> dict[str, Any]:
    """Check every key of ``value`` against ``schema``; fill in the defaults."""
    if not isinstance(value, dict):
        raise _type_error(path, "a mapping", value)
    unknown = sorted(set(value) - set(schema), key=str)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(schema))}"
        )
    out: dict[str, Any] = {}
    for key, field in schema.items():
        if key in value and value[key] is not None:
            out[key] = _value(f"{path}.{key}", field, value[key])
        elif field.required:
            raise ConfigError(f"{path}: missing required key {key!r}")
        else:
            out[key] = copy.deepcopy(field.default)
    return out


def _stages(path: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: expected a non-empty list of stages, got {value!r}")
    out = []
    for i, stage in enumerate(value):
        where = f"{path}[{i}]"
        kind = stage.get("type") if isinstance(stage, dict) else None
        if kind not in STAGE_TYPES:
            raise ConfigError(
                f"{where}.type: expected one of {list(STAGE_TYPES)}, got {kind!r}"
            )
        out.append(_mapping(where, stage, SCHEMAS[kind]))
    return out


def validate(recipe: Any) -> dict[str, Any]:
    """The checked recipe with defaults filled in; raises ``ConfigError`` /
    ``ConfigTypeError`` naming the key path at fault."""
    checked = _mapping("recipe", recipe, SCHEMAS["recipe"])
    needs_calibration = [i for i, s in enumerate(checked["stages"]) if s["type"] == "oneshot"]
    if needs_calibration and checked["calibration"] is None:
        raise ConfigError(
            f"recipe.stages[{needs_calibration[0]}]: a oneshot stage needs calibration data; "
            "add calibration: {file: ..., key: ...}"
        )
    return checked


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML recipe (``yaml.safe_load``: no Python objects)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"recipe '{path}': cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe '{path}': not valid YAML{where}") from None
    return validate(data)
