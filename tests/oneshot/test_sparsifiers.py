"""WandaSparsifier, SparseGPTSparsifier and AdmmSparsifier: prepare → calibrate → step →
squash_mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit import AdmmSparsifier, SparseGPTSparsifier, WandaSparsifier, WeightNormSparsifier
from prunekit.errors import ConfigError, ConfigTypeError, FqnError, StateError, UnsupportedError
from tests.helpers import assert_unchanged, snapshot
from tests.oneshot.test_math import correlated, rel_error

CLASSES = [WandaSparsifier, SparseGPTSparsifier, AdmmSparsifier]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def prune(cls, model: nn.Module, x: torch.Tensor, config=None, **kwargs) -> object:
    sparsifier = cls(**kwargs)
    sparsifier.prepare(model, config)
    with sparsifier.calibrate():
        model(x)
    sparsifier.step()
    return sparsifier


@pytest.mark.parametrize("cls", CLASSES)
def test_life_cycle_prunes_each_layer_exactly(cls):
    model = mlp()
    sparsifier = prune(cls, model, correlated(128, 32), sparsity_level=0.75)
    for layer in (model[0], model[2]):
        assert parametrize.is_parametrized(layer, "weight")
        assert layer.parametrizations.weight[0].mask.dtype == torch.bool
        assert float((layer.weight == 0).float().mean()) == 0.75
    sparsifier.squash_mask()
    assert not parametrize.is_parametrized(model[0])
    assert float((model[0].weight == 0).float().mean()) == 0.75


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("pattern", ["2:4", (4, 8), "1:4"])
def test_nm_holds_in_every_group(cls, pattern):
    model = mlp()
    prune(cls, model, correlated(128, 32), pattern=pattern).squash_mask()
    n, m = (int(v) for v in pattern.split(":")) if isinstance(pattern, str) else pattern
    for layer in (model[0], model[2]):
        groups = (layer.weight != 0).view(layer.out_features, -1, m).sum(-1)
        assert groups.le(n).all() and float(groups.float().mean()) > n - 0.01


def test_per_layer_overrides_in_the_config():
    model = mlp()
    config = [{"tensor_fqn": "0.weight", "sparsity_level": 0.25},
              {"tensor_fqn": "2.weight", "pattern": "2:4"}]
    prune(WandaSparsifier, model, correlated(64, 32), config).squash_mask()
    assert float((model[0].weight == 0).float().mean()) == 0.25
    assert (model[2].weight != 0).view(8, 4, 4).sum(-1).eq(2).all()


def test_sparsegpt_rewrites_kept_weights_wanda_does_not():
    x = correlated(256, 32)
    dense = mlp()[0].weight.detach().clone()
    for cls, updates in ((WandaSparsifier, False), (SparseGPTSparsifier, True),
                         (AdmmSparsifier, True)):
        model = nn.Sequential(nn.Linear(32, 16))
        model[0].weight.data.copy_(dense)
        prune(cls, model, x).squash_mask()
        kept = model[0].weight != 0
        assert torch.equal(model[0].weight[kept], dense[kept]) is not updates


def test_layer_error_order_through_the_classes():
    x = correlated(1024, 32)
    dense = mlp()[0].weight.detach().clone()
    errors = []
    for cls in (SparseGPTSparsifier, WandaSparsifier, WeightNormSparsifier):
        model = nn.Sequential(nn.Linear(32, 16, bias=False))
        model[0].weight.data.copy_(dense)
        if cls is WeightNormSparsifier:
            s = cls(sparsity_level=0.5, sparse_block_shape=(1, 1), norm=1)
            s.prepare(model, None)
            s.step()
        else:
            prune(cls, model, x)
        errors.append(rel_error(x, dense, model[0].weight.detach()))
    assert errors[0] < errors[1] < errors[2], errors


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_exact_update_keeps_the_obs_mask_and_lowers_the_layer_error(pattern):
    x = correlated(1024, 32)
    dense = mlp()[0].weight.detach().clone()
    weights = {}
    for exact in (False, True):
        model = nn.Sequential(nn.Linear(32, 16, bias=False))
        model[0].weight.data.copy_(dense)
        prune(SparseGPTSparsifier, model, x, pattern=pattern, exact_update=exact).squash_mask()
        weights[exact] = model[0].weight.detach()
    assert torch.equal(weights[True] != 0, weights[False] != 0)
    assert rel_error(x, dense, weights[True]) < 0.95 * rel_error(x, dense, weights[False])


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_admm_layer_error_below_exact_sparsegpt(pattern):
    x = correlated(1024, 32)
    dense = mlp()[0].weight.detach().clone()
    errors = []
    for cls, kwargs in ((SparseGPTSparsifier, {"exact_update": True}), (AdmmSparsifier, {})):
        model = nn.Sequential(nn.Linear(32, 16, bias=False))
        model[0].weight.data.copy_(dense)
        prune(cls, model, x, pattern=pattern, **kwargs).squash_mask()
        errors.append(rel_error(x, dense, model[0].weight.detach()))
    assert errors[1] < errors[0], errors


@pytest.mark.parametrize("cls", CLASSES)
def test_statistics_add_up_and_are_freed(cls):
    model = mlp()
    s = cls()
    s.prepare(model, None)
    with s.calibrate(["0.weight"]):
        model(torch.randn(8, 32))
    with s.calibrate(["0.weight"]):
        model(torch.randn(3, 2, 32))
    assert s._tokens == {"0.weight": 14}
    s.step(tensor_fqns=["0.weight"])
    assert s._stats == {} and (model[2].weight != 0).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_a_shared_statistic_prunes_like_its_own(cls):
    torch.manual_seed(0)
    model, x = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(16, 12)}), correlated(64, 16)
    own = {name: nn.Sequential(nn.Linear(16, layer.out_features)) for name, layer in model.items()}
    for name, alone in own.items():
        alone[0].load_state_dict(model[name].state_dict())
        prune(cls, alone, x).squash_mask()
    s = cls()
    s.prepare(model, None)
    with s.calibrate(["a.weight"]):
        model["a"](x)
    s.share_statistic("a.weight", ["b.weight"])
    s.step()
    s.squash_mask()
    for name, alone in own.items():
        torch.testing.assert_close(model[name].weight, alone[0].weight)


def test_share_statistic_refuses_uncalibrated_and_mismatched_layers():
    s = WandaSparsifier()
    s.prepare(mlp(), None)
    with pytest.raises(StateError, match=r"'0\.weight' has not been calibrated"):
        s.share_statistic("0.weight", ["2.weight"])
    with s.calibrate(["0.weight"]):
        s.groups[0]["module"](torch.randn(4, 32))
    with pytest.raises(ConfigError, match=r"'2\.weight' reads 16 inputs, '0\.weight' 32"):
        s.share_statistic("0.weight", ["2.weight"])
    with pytest.raises(FqnError, match="nope"):
        s.share_statistic("0.weight", ["nope"])


@pytest.mark.parametrize("cls", CLASSES)
def test_sparsity_zero_leaves_the_weights(cls):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(cls, model, correlated(64, 32), sparsity_level=0.0).squash_mask()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def first_layer_calibrated(cls):
    """An MLP prepared for ``cls``, with calibration data through its first layer only."""
    model, s = mlp(), cls()
    s.prepare(model, None)
    with s.calibrate(["0.weight"]):
        model(torch.randn(4, 32))
    return model, s


@pytest.mark.parametrize("cls", CLASSES)
def test_step_without_calibration_fails_and_changes_nothing(cls):
    model, s = first_layer_calibrated(cls)
    before = snapshot(model)
    with pytest.raises(StateError, match=r"no calibration data reached \['2.weight'\]"):
        s.step()
    assert_unchanged(before, model)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_layer_assumed_to_see_white_inputs_is_pruned_by_magnitude_and_kept_as_it_was(cls):
    model, s = first_layer_calibrated(cls)
    assert s.uncalibrated(["0.weight", "2.weight"]) == ["2.weight"]
    weight = model[2].weight.detach().clone()
    s.assume_white_inputs(s.uncalibrated(["2.weight"]))
    s.step()
    s.squash_mask()
    kept = model[2].weight != 0
    assert int(kept.sum()) == weight.numel() // 2
    # the smallest, compared in every row (Wanda) or across the layer (the others), ...
    dim = 1 if cls is WandaSparsifier else None
    largest_dropped = weight.abs().where(~kept, -torch.inf).amax(dim)
    assert (largest_dropped <= weight.abs().where(kept, torch.inf).amin(dim)).all()
    tolerance = 1e-6 if cls is AdmmSparsifier else 0.0  # its exact solve on H = I rounds
    torch.testing.assert_close(model[2].weight[kept], weight[kept], rtol=tolerance,
                               atol=tolerance)  # ... and no update


@pytest.mark.parametrize("cls", CLASSES)
def test_non_finite_inputs_fail_before_any_change(cls):
    model = mlp()
    s = cls()
    s.prepare(model, None)
    x = torch.randn(4, 32)
    with s.calibrate(["2.weight"]):
        model(x)
    x[0, 0] = float("nan")
    with s.calibrate(["0.weight"]):
        model(x)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'0'.* NaN or inf"):
        s.step()
    assert_unchanged(before, model)


def test_calibrate_checks_the_input_width():
    s = WandaSparsifier()
    layer = nn.Linear(8, 4)
    s.prepare(nn.Sequential(layer), None)
    message = r"'0.weight' got input \(2, 5\); expected \(..., 8\)"
    with pytest.raises(ConfigError, match=message), s.calibrate():
        layer(torch.randn(2, 5))
    assert not layer._forward_pre_hooks


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pattern": "4:2"}, ConfigError, "1 <= N < M, got 4:2"),
        ({"pattern": "4:4"}, ConfigError, "1 <= N < M, got 4:4"),
        ({"pattern": "2-4"}, ConfigError, "pattern must look like '2:4', got '2-4'"),
        ({"pattern": (2.0, 4)}, ConfigTypeError, r"pattern must be None, 'N:M' or \(N, M\)"),
        ({"sparsity_level": 1.5}, ConfigError, r"sparsity_level must be in \[0, 1\], got 1.5"),
    ],
)
@pytest.mark.parametrize("cls", CLASSES)
def test_bad_settings(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)


def test_sparsegpt_settings():
    with pytest.raises(ConfigError, match="percdamp > 0"):
        SparseGPTSparsifier(percdamp=0.0)
    with pytest.raises(ConfigTypeError, match="blocksize must be an int"):
        SparseGPTSparsifier(blocksize=1.5)
    with pytest.raises(ConfigTypeError, match="exact_update must be a bool, got 1"):
        SparseGPTSparsifier(exact_update=1)
    with pytest.raises(ConfigTypeError, match=r"percdamp must be a number, got '0\.1'"):
        AdmmSparsifier(percdamp="0.1")
    with pytest.raises(ConfigError, match="need iters >= 2, got 1"):
        AdmmSparsifier(iters=1)
    with pytest.raises(ConfigTypeError, match=r"iters must be an int, got 2\.5"):
        AdmmSparsifier(iters=2.5)


@pytest.mark.parametrize("cls", CLASSES)
def test_prepare_refuses_widths_and_layer_types_before_any_change(cls):
    model = nn.Sequential(nn.Linear(6, 4), nn.Conv2d(2, 2, 1))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"pattern 2:4 needs .* multiple of 4, got in_features=6"):
        cls(pattern="2:4").prepare(model, None)
    with pytest.raises(UnsupportedError, match=r"only the weights of nn.Linear or "
                       r"transformers' Conv1D layers can be calibrated, got Conv2d.weight"):
        cls().prepare(model, [{"tensor_fqn": "1.weight"}])
    assert_unchanged(before, model)


def test_calibrate_before_prepare():
    message = r"nothing is prepared; call prepare\(model, config\)"
    with pytest.raises(StateError, match=message), WandaSparsifier().calibrate():
        pass


def test_unknown_tensor_fqns():
    s = WandaSparsifier()
    s.prepare(mlp(), None)
    with pytest.raises(FqnError, match=r"step: \['1.weight'\] are not prepared tensors"):
        s.step(tensor_fqns=["1.weight"])
    with pytest.raises(ConfigTypeError, match="must be a list of names, got a str"), s.calibrate(
        "0.weight"
    ):
        pass


def test_state_dict_keeps_the_settings():
    model = mlp()
    s = prune(SparseGPTSparsifier, model, correlated(64, 32), pattern="2:4")
    groups = s.state_dict()["groups"]
    settings = [(g["pattern"], g["blocksize"], g["percdamp"]) for g in groups]
    assert settings == [("2:4", 128, 0.01)] * 2
    assert s.state_dict()["state"]["0.weight"]["mask"].dtype == torch.bool
