import pytest
import torch
from torch import nn
from torch.ao import pruning as ref

from prunekit import WeightNormSparsifier
from prunekit.masks import square


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_zero_fraction_on_all_ones_weights(level, block):
    """The reference's expected-results grid: zeros = level * zpb / block size exactly."""
    size = block[0] * block[1]
    for zeros in range(size + 1):
        model = nn.Sequential(nn.Linear(12, 12, bias=False))
        nn.init.ones_(model[0].weight)
        sparsifier = WeightNormSparsifier(level, block, zeros)
        sparsifier.prepare(model, None)
        sparsifier.step()
        mask = model[0].parametrizations.weight[0].mask
        assert float(1 - mask.float().mean()) == pytest.approx(level * zeros / size)


def test_two_to_four_and_reference_masks_over_several_steps():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    theirs = ref.WeightNormSparsifier(
        sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2
    )
    for sparsifier, model in zip([ours, theirs], models, strict=True):
        sparsifier.prepare(model, None)
        for _ in range(3):
            sparsifier.step()
    for i in (0, 2):
        a = models[0][i].parametrizations.weight[0].mask
        b = models[1][i].parametrizations.weight[0].mask
        assert torch.equal(a, b.bool())
        assert bool((a.view(a.shape[0], -1, 4).sum(-1) == 2).all())


def test_conv_weights_and_callable_norm():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv3d(8, 4, 1))
    config = [{"tensor_fqn": f"{i}.weight"} for i in range(3)]
    sparsifier = WeightNormSparsifier(0.5, (1, 1), norm=lambda w: w.abs() ** 3)
    sparsifier.prepare(model, config)
    sparsifier.step()
    for layer in model:
        assert int((layer.weight == 0).sum()) == round(0.5 * layer.weight.numel())


def test_level_can_go_down_and_entries_revive_at_zero():
    """Masks are recomputed each step (as in the reference); revived entries restart
    from 0 because prunekit keeps the stored original masked."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    sparsifier = WeightNormSparsifier(0.5, (1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    sparsifier.groups[0]["sparsity_level"] = 0.25
    sparsifier.step()
    mask = model[0].parametrizations.weight[0].mask
    assert int((~mask).sum()) == 16
    assert int((model[0].weight == 0).sum()) == 32  # 16 revived entries hold 0


def test_norm_functions():
    assert WeightNormSparsifier().norm_fn is square
    assert WeightNormSparsifier(norm=1).norm_fn is torch.abs
