"""Capture a model as an fx graph whose prunable layers stay whole, plus the shape of
every value for the given example inputs: torch.fx first, torch.export when fx fails."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from prunekit.errors import ConfigError
from prunekit.structured.engine.exported import export_graph
from prunekit.structured.engine.layers import layer_pruner

__all__ = ["CaptureError", "capture"]


class CaptureError(ConfigError):
    """The model could not be captured, or the example inputs do not run through it."""


class _LeafTracer(fx.Tracer):
    """torch.fx tracer that never looks inside a layer prunekit knows how to prune, nor
    inside the modules named in ``leaves`` (the user's ignored layers)."""

    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or layer_pruner(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and keeps the shape of every value; names the failing node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            where = f"module {n.target!r}" if n.op == "call_module" else f"node {n.name!r}"
            raise CaptureError(
                f"example_inputs do not run through the model: {where} ({n.format_node()}) "
                f"raised {type(exc).__name__}: {exc}. Pass inputs of the shape the model "
                "expects."
            ) from exc
        self.shapes[n] = _shape_of(result)
        return result


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


def capture(
    model: nn.Module, example_inputs: tuple[Any, ...], leaves: frozenset[str] = frozenset()
) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """Trace ``model`` with torch.fx and record shapes; the model is left unchanged.
    Shapes come from one no-grad pass in eval mode (BatchNorm statistics untouched, shapes
    as in inference): a real one, or on fake tensors when the model is on ``meta``. When fx cannot
    follow the code (e.g. Hugging Face ``transformers`` models), the model is captured
    with non-strict ``torch.export`` instead (:mod:`.exported`)."""
    try:
        graph = _LeafTracer(leaves).trace(model)
    except Exception as fx_error:
        with _eval(model), _without_cache(model):
            return _export(model, example_inputs, leaves, fx_error)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(names):
        raise CaptureError(
            f"example_inputs do not run through the model: {type(model).__name__}.forward takes "
            f"{len(names)} inputs {names} but got {len(example_inputs)}"
        )
    gm = fx.GraphModule(model, graph)
    with _eval(model):
        return graph, _record_shapes(gm, example_inputs)


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every module's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def _without_cache(model: nn.Module) -> Iterator[None]:
    """A transformers model with ``config.use_cache`` (every pretrained causal LM) returns
    a key/value cache object that torch.export cannot hold; the channels do not depend on
    it, so the capture runs without it and the setting is restored after."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _export(
    model: nn.Module, example_inputs: tuple[Any, ...], leaves: frozenset[str], fx_error: Exception
) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """The torch.export path; when it fails too, the error names both reasons."""
    try:
        return export_graph(model, example_inputs, leaves)
    except Exception as exc:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(fx_error).__name__}: "
            f"{_first_line(fx_error)}; torch.export (non-strict) could not capture it either: "
            f"{type(exc).__name__}: {_first_line(exc)}. Neither can follow Python control flow on "
            "tensor values; make that code depend on shapes only, or move it into a leaf "
            "module and list it in ignored_layers. If the example inputs are at fault, "
            "pass inputs of the shape the model expects."
        ) from exc


def _first_line(exc: Exception) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def _record_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> dict[fx.Node, Any]:
    """Shapes from a real pass (as cheap as one forward on the example inputs; fake
    tensors cost far more per op), or from fake tensors when any tensor is on the
    ``meta`` device (planning without memory)."""
    recorder = _ShapeRecorder(gm)
    tensors = [*gm.parameters(), *gm.buffers(), *example_inputs]
    if not any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        with torch.no_grad():
            recorder.run(*example_inputs)
        return recorder.shapes
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake:
        recorder.run(*(_fake(fake, x) for x in example_inputs))
    return recorder.shapes


def _fake(mode: FakeTensorMode, value: Any) -> Any:
    return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
