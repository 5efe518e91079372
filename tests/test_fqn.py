import pytest
import torch
from torch import nn
from torch.ao.pruning import (
    fqn_to_module as ref_fqn_to_module,
)
from torch.ao.pruning import (
    get_arg_info_from_tensor_fqn as ref_arg_info,
)
from torch.ao.pruning import (
    module_to_fqn as ref_module_to_fqn,
)

from prunekit import FqnError, fqn_to_module, get_arg_info_from_tensor_fqn, module_to_fqn
from prunekit.errors import ConfigTypeError
from prunekit.fqn import resolve_tensor_fqn
from tests.helpers import MLP


def test_module_to_fqn_matches_reference():
    model = MLP()
    for module in [model, model.linear1, model.seq, model.seq[2], nn.Linear(2, 2)]:
        assert module_to_fqn(model, module) == ref_module_to_fqn(model, module)
    assert module_to_fqn(model, model.seq[0], prefix="p.") == "p.seq.0"


def test_fqn_to_module_resolves_tensors_and_misses():
    model = MLP()
    for path in ["", "seq", "seq.0.weight", "scale", "nope", "seq.9.weight", "seq.0.nope"]:
        assert fqn_to_module(model, path) is ref_fqn_to_module(model, path)


def test_arg_info_matches_reference():
    model = MLP()
    for fqn in ["weight", "seq.0.weight", "linear1.weight", "missing.weight"]:
        ours, ref = get_arg_info_from_tensor_fqn(model, fqn), ref_arg_info(model, fqn)
        assert ours.keys() == ref.keys()
        assert all(ours[k] is ref[k] or ours[k] == ref[k] for k in ours)


def test_resolve_names_failing_part_and_suggests():
    model = MLP()
    with pytest.raises(FqnError, match=r"'seq' has no submodule '5'.*'0', '1', '2'"):
        resolve_tensor_fqn(model, "seq.5.weight")
    with pytest.raises(FqnError, match=r"no parameter or buffer 'wieght'; did you mean 'weight'"):
        resolve_tensor_fqn(model, "linear1.wieght")
    with pytest.raises(FqnError, match=r"no submodule 'lineer1'; did you mean 'linear1'"):
        resolve_tensor_fqn(model, "lineer1.weight")
    with pytest.raises(ConfigTypeError, match="tensor_fqn must be a str"):
        resolve_tensor_fqn(model, 3)
    assert resolve_tensor_fqn(model, ".seq.0.weight")["module"] is model.seq[0]


def test_fqn_error_is_a_key_error_with_readable_message():
    err = FqnError("x 'y'")
    assert isinstance(err, KeyError) and str(err) == "x 'y'"
    assert torch.equal(resolve_tensor_fqn(MLP(), "scale")["module"].scale, torch.ones(12))
