import copy
import pickle

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
    ActivationSparsifier as RefActivationSparsifier,
)

from prunekit.data import ActivationSparsifier
from prunekit.errors import ConfigError, ConfigTypeError, FqnError, StateDictError, StateError


def agg_add(x, y):
    return x + y


def reduce_mean(x):
    return x.mean(dim=0)


def mask_above(data, threshold):
    return (data.abs() > threshold).float()


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)
        self.add = TwoInputs()

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.add(self.fc2(h), torch.ones(1))


def make(cls, model, **kwargs):
    s = cls(model, aggregate_fn=agg_add, reduce_fn=reduce_mean, mask_fn=mask_above, threshold=0.3)
    s.register_layer(model.fc1)
    s.register_layer(model.fc2, features=[0, 3, 5], feature_dim=1, threshold=0.1, **kwargs)
    return s


def batches(n=3, size=4):
    torch.manual_seed(0)
    return [torch.randn(size, 8) for _ in range(n)]


def test_masks_and_outputs_match_the_reference():
    model = Net()
    ref_model = copy.deepcopy(model)
    ours, ref = make(ActivationSparsifier, model), make(RefActivationSparsifier, ref_model)
    for x in batches():
        model(x), ref_model(x)
    ours.step()
    ref.step()
    assert torch.equal(ours.get_mask("fc1"), ref.get_mask("fc1"))
    for a, b in zip(ours.get_mask("fc2"), ref.get_mask("fc2"), strict=True):
        assert torch.equal(a, b)
    assert ours.data_groups.keys() == ref.data_groups.keys()
    assert ours.data_groups["fc2"].keys() == ref.data_groups["fc2"].keys()
    assert ours.data_groups["fc2"]["sparse_config"] == {"threshold": 0.1}
    ours.squash_mask()
    ref.squash_mask()
    x = torch.randn(4, 8)
    assert torch.allclose(model(x), ref_model(x.clone()))


def test_mask_before_forward_and_unknown_names():
    model = Net()
    s = make(ActivationSparsifier, model)
    with pytest.raises(StateError, match="get_mask\\('fc1'\\): shape unknown"):
        s.get_mask("fc1")
    with pytest.raises(ValueError, match="no layer named 'fc3'"):
        s.get_mask("fc3")
    with pytest.raises(FqnError, match="Linear is not a submodule"):
        s.get_mask(layer=nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="pass the layer's name"):
        s.get_mask()
    model(torch.randn(2, 8))
    assert torch.equal(s.get_mask(layer=model.fc1), torch.ones(2, 8))


def test_step_without_a_new_forward_keeps_masks():
    model = Net()
    s = make(ActivationSparsifier, model)
    model(batches()[0])
    s.step()
    masks = s.get_mask("fc1").clone()
    with pytest.warns(UserWarning, match="no forward through layer\\(s\\) \\['fc1', 'fc2'\\]"):
        s.step()
    assert torch.equal(s.get_mask("fc1"), masks)


def test_varying_batch_sizes_aggregate_zero_padded():
    model = Net()
    s = make(ActivationSparsifier, model)
    x1, x2 = torch.randn(4, 8), torch.randn(2, 8)
    model(x1)
    model(x2)
    expected = x1.clone()
    expected[:2] += x2
    assert torch.equal(s.data_groups["fc1"]["data"], expected)
    with pytest.raises(ConfigError, match=r"layer 'fc1'.*\(4, 3\).*only the batch"):
        model.fc1(torch.randn(4, 3))
    assert torch.equal(s.data_groups["fc1"]["data"], expected)
    s.step()
    assert torch.equal(s.get_mask("fc1"), mask_above(reduce_mean(expected), 0.3))


def test_sparsify_hook_leaves_the_callers_input_alone_and_keeps_other_arguments():
    model = Net()
    s = ActivationSparsifier(model, agg_add, reduce_mean, mask_above, threshold=0.0)
    s.register_layer(model.add, features=[1], feature_dim=1)
    y = torch.ones(1)
    model(torch.randn(3, 8))
    s.step()
    s.get_mask("add")[0].zero_()
    s.squash_mask()
    x = torch.ones(3, 4)
    out = model.add(x, y)
    assert torch.equal(x, torch.ones(3, 4))
    assert out[:, 1].tolist() == [1.0, 1.0, 1.0] and out[:, 0].tolist() == [2.0, 2.0, 2.0]


def test_aggregation_records_no_autograd_history():
    model = Net()
    s = make(ActivationSparsifier, model)
    model(torch.randn(2, 8, requires_grad=True))
    assert not s.data_groups["fc1"]["data"].requires_grad


def test_squash_without_hook_then_with_hook():
    model = Net()
    s = make(ActivationSparsifier, model)
    model(batches()[0])
    s.step()
    s.squash_mask(attach_sparsify_hook=False)
    assert s.data_groups["fc1"]["hook_state"] == "None" and "hook" not in s.data_groups["fc1"]
    assert len(model.fc1._forward_pre_hooks) == 0
    s.squash_mask()
    s.squash_mask()
    assert s.data_groups["fc1"]["hook_state"] == "sparsify"
    assert len(model.fc1._forward_pre_hooks) == 1


def test_squash_before_any_forward_changes_nothing():
    model = Net()
    s = make(ActivationSparsifier, model)
    with pytest.raises(StateError, match="\\['fc1', 'fc2'\\] have no mask yet"):
        s.squash_mask()
    assert s.data_groups["fc1"]["hook_state"] == "aggregate"
    model(torch.randn(2, 8))
    assert "data" in s.data_groups["fc1"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"features": [0]}, ConfigError, "need a feature_dim"),
        ({"features": 0, "feature_dim": 1}, ConfigTypeError, "features must be a list of ints"),
        ({"feature_dim": "1"}, ConfigTypeError, "feature_dim must be an int"),
        ({"mask_fn": 3}, ConfigTypeError, "mask_fn must be callable, got 3"),
    ],
)
def test_register_layer_errors_change_nothing(kwargs, error, match):
    model = Net()
    s = ActivationSparsifier(model, agg_add, reduce_mean, mask_above, threshold=0.1)
    s.register_layer(model.fc1)
    with pytest.raises(error, match=match):
        s.register_layer(model.fc1, **kwargs)
    assert list(s.data_groups) == ["fc1"] and len(model.fc1._forward_pre_hooks) == 1
    with pytest.raises(FqnError, match="not a submodule"):
        s.register_layer(nn.Linear(2, 2))


def test_missing_default_function_is_named():
    model = Net()
    s = ActivationSparsifier(model, reduce_fn=reduce_mean, mask_fn=mask_above)
    with pytest.raises(
        ConfigTypeError, match="layer 'fc1': aggregate_fn must be callable, got None"
    ):
        s.register_layer(model.fc1)


def test_reregister_warns_and_unregister():
    model = Net()
    s = make(ActivationSparsifier, model)
    with pytest.warns(UserWarning, match="'fc1' already attached"):
        s.register_layer(model.fc1, threshold=0.9)
    assert s.data_groups["fc1"]["sparse_config"] == {"threshold": 0.9}
    assert len(model.fc1._forward_pre_hooks) == 1
    s.unregister_layer("fc1")
    assert "fc1" not in s.data_groups and "fc1" not in s.state
    assert len(model.fc1._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="no layer named 'fc1'"):
        s.unregister_layer("fc1")


def test_pickle_round_trip_keeps_working():
    model = Net()
    s = make(ActivationSparsifier, model)
    model(batches()[0])
    copied = pickle.loads(pickle.dumps(s))
    for x in batches()[1:]:
        model(x)
        copied.model(x)
    s.step()
    copied.step()
    assert torch.equal(copied.get_mask("fc1"), s.get_mask("fc1"))
    assert copied.data_groups["fc1"]["layer"] is copied.model.fc1


def test_state_dict_round_trip_and_no_duplicate_hooks():
    model = Net()
    s = make(ActivationSparsifier, model)
    model(batches()[0])
    s.step()
    s.squash_mask()
    sd = s.state_dict()
    assert sd["state"]["fc1"]["mask"].layout == torch.sparse_coo
    assert "hook" not in sd["data_groups"]["fc1"] and "layer" not in sd["data_groups"]["fc1"]
    assert set(sd["defaults"]) == {
        "sparse_config",
        "aggregate_fn",
        "reduce_fn",
        "mask_fn",
        "features",
        "feature_dim",
    }
    target_model = copy.deepcopy(model)
    for module in target_model.modules():
        module._forward_pre_hooks.clear()
    target = make(ActivationSparsifier, target_model)
    target.load_state_dict(sd)
    assert len(target_model.fc1._forward_pre_hooks) == 1
    assert target.data_groups["fc1"]["hook_state"] == "sparsify"
    x = torch.randn(2, 8)
    assert torch.equal(target_model(x), model(x))


def test_state_dicts_cross_load_with_the_reference():
    model = Net()
    ref_model = copy.deepcopy(model)
    ours, ref = make(ActivationSparsifier, model), make(RefActivationSparsifier, ref_model)
    for x in batches():
        model(x), ref_model(x)
    ours.step()
    ref.step()
    fresh = ActivationSparsifier(copy.deepcopy(model))
    fresh.load_state_dict(ref.state_dict())
    assert torch.equal(fresh.get_mask("fc1"), ours.get_mask("fc1"))
    back = RefActivationSparsifier(copy.deepcopy(ref_model))
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.get_mask("fc1"), ref.get_mask("fc1"))


def test_bad_state_dict_changes_nothing():
    model = Net()
    s = make(ActivationSparsifier, model)
    sd = s.state_dict()
    sd["data_groups"]["nope"] = dict(sd["data_groups"]["fc1"])
    sd["state"]["nope"] = {"mask": None}
    with pytest.raises(StateDictError, match="layer 'nope' is not a submodule"):
        s.load_state_dict(sd)
    assert len(model.fc1._forward_pre_hooks) == 1 and list(s.data_groups) == ["fc1", "fc2"]
