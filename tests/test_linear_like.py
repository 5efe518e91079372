"""Linear-like layers: nn.Linear and transformers' Conv1D, seen as ``out x in``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from prunekit.linear_like import in_features, is_conv1d, is_linear_like, out_in


def test_conv1d_is_a_linear_like_layer_seen_as_out_by_in():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = Conv1D(nf=6, nx=4)
    assert is_conv1d(layer) and is_linear_like(layer) and in_features(layer) == 4
    assert out_in(layer, layer.weight).shape == (6, 4)
    linear = nn.Linear(4, 6)
    assert not is_conv1d(linear) and is_linear_like(linear) and in_features(linear) == 4
    assert out_in(linear, linear.weight) is linear.weight
    assert not is_linear_like(nn.Conv1d(4, 6, 1))


def test_conv1d_is_recognised_without_importing_transformers():
    """``import prunekit`` leaves transformers unloaded (the default install has no
    ``[llm]`` extra); no model can then hold a Conv1D, and none is looked for."""
    script = ("import sys, torch, prunekit, prunekit.deploy, prunekit.structured.engine\n"
              "from prunekit.linear_like import conv1d_class, is_linear_like\n"
              "from prunekit.structured.engine.layers import layer_pruner\n"
              "assert layer_pruner(torch.nn.Linear(2, 2)) is not None\n"
              "assert 'transformers' not in sys.modules\n"
              "assert conv1d_class() is None and is_linear_like(torch.nn.Linear(2, 2))\n"
              "assert not is_linear_like(torch.nn.Conv1d(2, 2, 1))\n"
              "assert 'transformers' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
