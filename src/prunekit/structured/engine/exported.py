"""Capture through ``torch.export`` (non-strict) for models torch.fx cannot trace, such as
Hugging Face ``transformers`` models.

The exported ATen graph is rewritten into the torch-level form the channel handlers read:
every call of a prunable (or ignored) layer becomes one ``call_module`` node again, with
the exact arguments and outputs export recorded for it (``preserve_module_call_signature``),
parameters become ``get_attr`` nodes, and ATen ops are renamed to their torch functions
(:mod:`prunekit.structured.engine.aten`). Shapes come from export's fake values, so nothing
runs for real and the model is left unchanged.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from prunekit.structured.engine.aten import translate
from prunekit.structured.engine.channels.heads import SIZES_FROM_EXPORT
from prunekit.structured.engine.layers import layer_pruner

__all__ = ["export_graph", "leaf_fqns"]


def leaf_fqns(model: nn.Module, leaves: frozenset[str]) -> list[str]:
    """Prunable or ignored submodules that no other such module contains."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in found):
            continue
        if name in leaves or layer_pruner(module) is not None:
            found.append(name)
    return found


def export_graph(
    model: nn.Module, example_inputs: tuple[Any, ...], leaves: frozenset[str]
) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """Export ``model`` (already in the mode wanted) and rewrite its graph; export errors
    propagate to the caller, which names them."""
    fqns = leaf_fqns(model, leaves)
    with warnings.catch_warnings():  # RNNs re-assign their weight list while traced
        warnings.filterwarnings("ignore", message=".*were assigned during export")
        program = torch.export.export(
            model, example_inputs, strict=False, preserve_module_call_signature=tuple(fqns)
        )
    return _Rewriter(model, program, frozenset(fqns)).run()


def _opaque(*args: Any) -> None:
    """Stands for a value the channel walk must not look into (constants, export's own
    submodules, layer internals nobody outside reads): unknown, so always safe."""


_ALIASING = (torch.ops.aten.to, torch.ops.aten.alias, torch.ops.aten.detach)


def _aliased(node: fx.Node) -> fx.Node | None:
    """The input of a conversion that returned its input itself (``x.to(x.dtype)``), else
    None. Tracing records every later use of ``x`` as a use of the conversion's output:
    a layer's ``hidden.to(torch.float32)`` hands its input, under the conversion's name,
    to the residual sum outside it (Hugging Face's RMSNorm), which must still see ``x``."""
    target = getattr(node.target, "overloadpacket", None)
    source = node.args[0] if node.op == "call_function" and node.args else None
    if target not in _ALIASING or not isinstance(source, fx.Node):
        return None
    before, after = source.meta.get("val"), node.meta.get("val")
    same = (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and (before.dtype, before.device, before.shape, before.stride())
            == (after.dtype, after.device, after.shape, after.stride()))
    return source if same else None


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


def _call_key(stack: dict[str, tuple[str, Any]], leaves: frozenset[str]) -> str | None:
    """``fqn`` or ``fqn@k`` (k-th call) of the outermost leaf module a node runs in."""
    for key, (path, _) in stack.items():
        if path in leaves:
            return path + (f"@{key.rpartition('@')[2]}" if "@" in key else "")
    return None


class _Rewriter:
    """One pass over the exported graph, building the torch-level graph and its shapes."""

    def __init__(self, model: nn.Module, program: ExportedProgram, leaves: frozenset[str]) -> None:
        self.model, self.program, self.leaves = model, program, leaves
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.shapes: dict[fx.Node, Any] = {}
        self.calls = {e.fqn: e.signature for e in program.module_call_graph if e.signature}
        self.done: set[str] = set()
        self.inputs = {s.arg.name: s for s in program.graph_signature.input_specs}

    def run(self) -> tuple[fx.Graph, dict[fx.Node, Any]]:
        old = self.program.graph_module.graph
        self.by_name = {n.name: n for n in old.nodes}
        for node in old.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif node.op == "get_attr":
                self._emit(node, "call_function", _opaque, (), {})
            else:
                self._call(node)
        return self.graph, self.shapes

    def _placeholder(self, node: fx.Node) -> None:
        spec = self.inputs[node.name]
        if spec.kind == InputKind.USER_INPUT:
            self._emit(node, "placeholder", node.name, (), {})
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            self._emit(node, "get_attr", spec.target, (), {})
        else:
            self._emit(node, "call_function", _opaque, (), {})

    def _output(self, node: fx.Node) -> None:
        specs = self.program.graph_signature.output_specs
        outs = [
            self._arg(a)
            for a, s in zip(node.args[0], specs, strict=True)
            if s.kind == OutputKind.USER_OUTPUT
        ]
        self.graph.output(tuple(outs))

    def _call(self, node: fx.Node) -> None:
        call = _call_key(node.meta.get("nn_module_stack") or {}, self.leaves)
        if call is None:
            op, target, args, kwargs = translate(node, self.shapes_of)
            if target is not None:
                new = self._emit(node, op, target, self._arg(args), self._arg(kwargs))
                new.meta[SIZES_FROM_EXPORT] = True
        elif call not in self.done:
            self.done.add(call)
            self._module_call(node, call)

    def _module_call(self, first: fx.Node, call: str) -> None:
        """One ``call_module`` node for a whole leaf call, its outputs unpacked with
        ``getitem`` into the nodes that export's signature names."""
        sig = self.calls.get(call)
        if sig is None:  # export kept no signature: the layer stays opaque
            self._emit(first, "call_function", _opaque, (), {})
            return
        args, kwargs = pytree.tree_unflatten([self._spec(s) for s in sig.inputs], sig.in_spec)
        node = self.graph.call_module(call.partition("@")[0], tuple(args), dict(kwargs))
        vals = [self._val(s) for s in sig.outputs]
        self.shapes[node] = _shape_of(pytree.tree_unflatten(vals, sig.out_spec))
        flat = [s.name if isinstance(s, TensorArgument) else None for s in sig.outputs]
        names = pytree.tree_unflatten(flat, sig.out_spec)
        self._unpack(node, names)

    def _unpack(self, node: fx.Node, names: Any) -> None:
        if isinstance(names, str):
            self.env[self.by_name[names]] = node
        elif isinstance(names, (tuple, list)):
            for i, item in enumerate(names):
                part = self.graph.call_function(operator.getitem, (node, i))
                self.shapes[part] = self.shapes[node][i]
                self._unpack(part, item)

    def _spec(self, spec: Any) -> Any:
        """An argument of a preserved call: the new node of a tensor, else its value."""
        if isinstance(spec, TensorArgument):
            return self._arg(self.by_name[spec.name])
        return getattr(spec, "value", None)

    def _val(self, spec: Any) -> Any:
        if isinstance(spec, TensorArgument):
            return self.by_name[spec.name].meta.get("val")
        return getattr(spec, "value", None)

    def shapes_of(self, value: Any) -> Any:
        """Shape(s) of an old node's value, for the op translations."""
        return _shape_of(value.meta.get("val")) if isinstance(value, fx.Node) else None

    def _arg(self, value: Any) -> Any:
        return fx.map_arg(value, self._lookup)

    def _lookup(self, old: fx.Node) -> fx.Node:
        """The new node of ``old``; a layer internal that nothing exported becomes opaque,
        unless it is its input under another name (``_aliased``)."""
        if old not in self.env:
            source = _aliased(old)
            if source is not None:
                self.env[old] = self._lookup(source)
            else:
                self._emit(old, "call_function", _opaque, (), {})
        return self.env[old]

    def _emit(self, old: fx.Node, op: str, target: Any, args: Any, kwargs: Any) -> fx.Node:
        new = self.graph.create_node(op, target, args, kwargs, name=old.name)
        if "nn_module_stack" in old.meta:
            new.meta["nn_module_stack"] = old.meta["nn_module_stack"]
        self.env[old] = new
        self.shapes[new] = _shape_of(old.meta.get("val"))
        return new
