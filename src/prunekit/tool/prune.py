"""``prunekit prune``: run a recipe's stages on a model and write the result folder.

Everything the user supplies (recipe, model, weights, calibration data, output folder) is
checked before any pruning starts, and the output is written to a staging folder renamed
into place at the end, so a failed run leaves nothing half-written. The folder is itself
a checkpoint: ``prunekit.load(factory, OUT)`` rebuilds the pruned model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import ConfigError
from prunekit.tool.checkpoint import replace_dir, write_checkpoint
from prunekit.tool.measure import layer_table, summarize
from prunekit.tool.modelspec import LoadedModel, load_model
from prunekit.tool.recipe import load_recipe
from prunekit.tool.report import Report, add_model, make_report, write_report
from prunekit.tool.stages import backend, oneshot_stage, structured_stage, unstructured_stage

__all__ = ["RUN_JSON", "example_from_shape", "run_prune"]

RUN_JSON = "run.json"


def load_calibration(spec: dict[str, Any]) -> list[torch.Tensor]:
    """``batches`` batches of ``batch_size`` samples from a safetensors file."""
    file, key = spec["file"], spec["key"]
    try:
        tensors = load_file(file)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise ConfigError(f"calibration file '{file}': cannot read it ({exc})") from None
    if key not in tensors:
        raise ConfigError(
            f"calibration file '{file}': no tensor {key!r}; it holds {sorted(tensors)}")
    data, size = tensors[key], spec["batch_size"]
    needed = spec["batches"] * size
    if data.dim() == 0 or data.shape[0] < needed:
        raise ConfigError(
            f"calibration '{file}'[{key!r}]: {spec['batches']} batches of {size} need {needed} "
            f"samples along dim 0, got shape {list(data.shape)}"
        )
    return [data[i * size : (i + 1) * size] for i in range(spec["batches"])]


def example_from_shape(shape: list[int], dtype: str) -> tuple[torch.Tensor]:
    """A random (float) or zero (integer) example input of ``shape``."""
    if dtype == "int64":
        return (torch.zeros(shape, dtype=torch.int64),)
    return (torch.randn(shape, dtype=getattr(torch, dtype)),)


def _example(recipe: dict, loaded: LoadedModel, calibration: list[torch.Tensor]) -> tuple:
    if calibration:
        return (calibration[0][:1],)  # one sample: MACs and latency per input
    if recipe["input_shape"] is not None:
        return example_from_shape(recipe["input_shape"], recipe["input_dtype"])
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    raise ConfigError("recipe: needs input_shape (or calibration data) to run the model")


def check_fits(model: nn.Module, inputs: tuple, source: str) -> None:
    """Run ``model`` once on ``inputs``; a failure is the user's data not fitting."""
    try:
        with torch.inference_mode():
            model(*inputs)
    except Exception as exc:  # any error of the forward pass means the input does not fit
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        raise ConfigError(f"{source} of shape {shapes} does not fit the model: {first}") from None


def _run_stage(model: nn.Module, stage: dict, recipe: dict, example: tuple,
               calibration: list[torch.Tensor]) -> None:
    ignore = [*recipe["ignore"], *stage.get("ignore", [])]
    if stage["type"] == "unstructured":
        unstructured_stage(model, stage["sparsity"], steps=stage["schedule"]["steps"],
                           block=stage["block"], zeros_per_block=stage["zeros_per_block"],
                           layer_types=stage["layers"], ignore=ignore)
    elif stage["type"] == "structured":
        structured_stage(model, example, stage["ratio"], stage["importance"], ignore)
    else:
        oneshot_stage(model, calibration, stage["method"], stage["sparsity"],
                      stage["dense_targets"], stage["exact_update"], stage["offload_folder"])


def check_backends(recipe: dict) -> None:
    """Every stage's backend exists and knows the stage's importance, before any work."""
    for i, stage in enumerate(recipe["stages"]):
        if stage["type"] == "unstructured":
            continue
        backend(stage["type"])
        if stage["type"] == "structured" and stage["importance"] is not None:
            from prunekit.structured.engine import importance_names

            if stage["importance"] not in importance_names():
                raise ConfigError(
                    f"recipe.stages[{i}].importance: expected one of {importance_names()}, "
                    f"got {stage['importance']!r}"
                )


def _record(report: Report, label: str, model: nn.Module, example: tuple) -> None:
    add_model(report, label, summarize(model, example, repeats=10), layer_table(model, example))


def _write(out: Path, loaded: LoadedModel, recipe: dict, run: dict, report: Report,
           example: tuple) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_checkpoint(loaded.model, staging)
        (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (staging / RUN_JSON).write_text(json.dumps(run, indent=1))
        if loaded.exported:
            torch.export.save(torch.export.export(loaded.model, example), staging / "model.pt2")
        write_report(report, staging)
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_prune(model_spec: str, recipe_path: str, out: str, weights: str | None = None,
              overwrite: bool = False, progress: bool = True) -> Report:
    """Validate everything, run the recipe's stages in order, write ``out``."""
    recipe = load_recipe(recipe_path)
    check_backends(recipe)
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"--out '{out}' already exists; pass --overwrite to replace it")
    loaded = load_model(model_spec, weights)
    calibration = load_calibration(recipe["calibration"]) if recipe["calibration"] else []
    example = _example(recipe, loaded, calibration)
    check_fits(loaded.model, (calibration[0],) if calibration else example,
               "calibration batch" if calibration else "example input")
    if recipe["seed"] is not None:
        torch.manual_seed(recipe["seed"])
    report = make_report(f"prunekit prune {model_spec}", "prune", "metric")
    _record(report, "before", loaded.model, example)
    for stage in tqdm(recipe["stages"], desc="stages", unit="stage", disable=not progress or None):
        _run_stage(loaded.model, stage, recipe, example, calibration)
    _record(report, "after", loaded.model, example)
    run = {"model": model_spec, "weights": weights, "example_shapes":
           [list(t.shape) for t in example], "example_dtype": str(example[0].dtype)}
    _write(target, loaded, recipe, run, report, example)
    return report
