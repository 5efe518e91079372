"""Shared test helpers: model snapshots that prove a failed call changed nothing, the
manual one-layer pruning the one-shot tests compare the engine with, and GPT-2's twin
with plain Linears."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a call could change: tensors (values, dtype, identity), parametrizations,
    module types and attributes that pruning touches."""
    tensors = {
        name: (t.detach().clone(), t.dtype, id(t))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    params = {
        f"{name}.{t}": [type(p).__name__ for p in m.parametrizations[t]]
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m)
        for t in m.parametrizations
    }
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    extras = {name: getattr(m, "sparse_params", None) for name, m in model.named_modules()}
    return {"tensors": tensors, "params": params, "types": types, "extras": extras}


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert before["types"] == after["types"]
    assert before["params"] == after["params"]
    assert before["extras"] == after["extras"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (value, dtype, ident) in before["tensors"].items():
        new_value, new_dtype, new_ident = after["tensors"][name]
        assert new_dtype == dtype and new_ident == ident, name
        assert torch.equal(value, new_value), name


class MLP(nn.Module):
    """Two linear layers with a nested submodule, like the reference's test models."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(16, 16, bias=False)
        self.seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12))
        self.register_buffer("scale", torch.ones(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(self.linear1(x)) * self.scale


def stack_of_blocks(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)])


def prune_manually(cls: type, layer: nn.Linear, inputs: list[torch.Tensor]) -> None:
    s = cls()
    s.prepare(layer, [{"tensor_fqn": "weight"}])
    with s.calibrate(), torch.no_grad():
        for x in inputs:
            layer(x)
    s.step()
    s.squash_mask()


def linearized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every transformers ``Conv1D`` (weight ``in x out``)
    replaced by the ``nn.Linear`` it computes."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            nx, nf = module.weight.shape
            linear = nn.Linear(nx, nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin
