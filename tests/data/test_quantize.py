import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefDNS
from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
    post_training_sparse_quantize as ref_ptsq,
)

from prunekit.data import DataNormSparsifier, post_training_sparse_quantize
from prunekit.errors import ConfigError, ConfigTypeError, FqnError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.inner = nn.Sequential(nn.EmbeddingBag(12, 8), nn.Linear(8, 8))


def quantized_state(model):
    out = {}
    for name in ("emb", "inner.0"):
        module = model.get_submodule(name)
        weight = module.weight() if callable(module.weight) else None
        out[name] = (type(module).__name__, weight)
    return out


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_matches_the_reference(sparsify_first):
    ours, ref = Model(), Model()
    config = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 2}
    post_training_sparse_quantize(ours, DataNormSparsifier, sparsify_first, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_ptsq(ref, RefDNS, sparsify_first, **config)
    for name in ("emb", "inner.0"):
        a, b = ours.get_submodule(name).weight(), ref.get_submodule(name).weight()
        assert type(ours.get_submodule(name)) is type(ref.get_submodule(name))
        assert torch.equal(a.int_repr(), b.int_repr())
        assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
    assert isinstance(ours.inner[1], nn.Linear)
    zeros = ours.emb.weight().int_repr() == ours.emb.weight().q_per_channel_zero_points().round()[
        :, None
    ].to(torch.uint8)
    assert zeros.float().mean() >= 0.25


def test_select_embeddings_only_touches_those():
    model = Model()
    post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=[model.inner[0]])
    assert type(model.emb) is nn.Embedding and type(model.inner[0]) is not nn.EmbeddingBag


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((DataNormSparsifier,), {"select_embeddings": "emb"}, ConfigTypeError, "must be a list"),
        (
            (DataNormSparsifier,),
            {"select_embeddings": [nn.Linear(2, 2)]},
            ConfigTypeError,
            r"\[0\] is a Linear",
        ),
        (
            (DataNormSparsifier,),
            {"select_embeddings": [nn.Embedding(2, 2)]},
            FqnError,
            "not part of the model",
        ),
        ((nn.Linear,), {}, ConfigTypeError, "subclass of BaseDataSparsifier"),
        ((DataNormSparsifier,), {"zeros_per_block": 9}, ConfigError, "zeros_per_block"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(args, kwargs, error, match):
    model = Model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        post_training_sparse_quantize(model, *args, **kwargs)
    assert type(model.emb) is nn.Embedding
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_colliding_data_names_are_rejected():
    model = nn.Module()
    model.a_b = nn.Embedding(4, 4)
    model.a = nn.Module()
    model.a.b = nn.Embedding(4, 4)
    with pytest.raises(ConfigError, match=r"same data name\(s\) \['a_b'\]"):
        post_training_sparse_quantize(model, DataNormSparsifier)
    assert type(model.a_b) is nn.Embedding
