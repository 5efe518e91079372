"""auto's model round: the deployed model, not only each layer, must not run slower."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit.deploy.convert as convert
import prunekit.deploy.model_round as model_round
from prunekit.deploy import SparseLinear, to_sparse
from tests.deploy._models import sparse_mlp

X = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))


class Rotary(nn.Module):
    """Pairs of features as complex numbers, as Llama 4's rotary embedding reads its
    query: ``torch.view_as_complex`` refuses a last dimension that is not contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * 1j).flatten(-2)


def _timing(monkeypatch, times: dict[str, float], layer_speedup=lambda dense: 5.0) -> None:
    """Every layer times CSR 10x faster than dense and ``layer_speedup(dense module)`` in
    its paired look; the model round measures ``times`` (ms per variant, by name), and
    its paired looks the ratio of two variants' ``times``."""
    monkeypatch.setattr(convert, "time_candidates", lambda c, x: {"dense": 1.0, "csr": 0.1})
    monkeypatch.setattr(convert, "confirmed_speedup", lambda dense, s, x: layer_speedup(dense))
    monkeypatch.setattr(model_round, "time_candidates",
                        lambda variants, x: {name: times[name] for name in variants})
    monkeypatch.setattr(model_round, "confirmed_speedup",
                        lambda base, other, x: times[base.name] / times[other.name])


def test_a_deployed_model_slower_than_dense_gets_its_layers_back(monkeypatch):
    _timing(monkeypatch, {"dense": 1.0, "as chosen": 1.4, "contiguous outputs": 1.3})
    model = sparse_mlp()
    deployed = to_sparse(model, X)
    assert deployed.deploy_report.chosen() == {"0": "dense", "2": "dense"}
    assert all(type(deployed[i]) is nn.Linear for i in (0, 2))
    reason = deployed.deploy_report["0"].reason
    assert "confirmed 5.00x" in reason  # the layer's own round, then the model's
    assert "ran 0.77x dense in paired timing: these layers were put back dense" in reason
    assert "as chosen 1.400 ms" in deployed.deploy_report.model
    torch.testing.assert_close(deployed(X), model(X))


@pytest.mark.parametrize(("contiguous_ms", "expected"), [(0.5, True), (0.97, False)])
def test_contiguous_outputs_are_kept_only_when_they_pay(monkeypatch, contiguous_ms, expected):
    """Faster than the views by half the margin (5 %) in paired timing, or the views stay."""
    _timing(monkeypatch, {"dense": 1.2, "as chosen": 1.0, "contiguous outputs": contiguous_ms})
    deployed = to_sparse(sparse_mlp(), X)
    assert deployed.deploy_report.chosen() == {"0": "csr", "2": "csr"}
    assert deployed[0].contiguous_output is expected and deployed[2].contiguous_output is expected
    kept, speedup = ("contiguous outputs", 2.4) if expected else ("as chosen", 1.2)
    assert deployed.deploy_report.model.endswith(f"kept {kept}, {speedup:.2f}x dense in "
                                                 "paired timing")
    assert deployed(X).is_contiguous() is expected


def test_a_layer_kept_dense_joins_a_faster_sparse_chain(monkeypatch):
    """The second layer lost its own round (dense input); in the model it reads the
    first's transposed output, and every layer sparse runs fastest."""
    times = {"dense": 1.0, "as chosen": 0.9, "contiguous outputs": 1.0, "every layer sparse": 0.5}
    _timing(monkeypatch, times, layer_speedup=lambda dense: 5.0 if dense.out_features == 128
            else 1.0)
    model = sparse_mlp()
    deployed = to_sparse(model, X)
    report = deployed.deploy_report
    assert report.chosen() == {"0": "csr", "2": "csr"}
    assert isinstance(deployed[2], SparseLinear) and not deployed[2].contiguous_output
    assert "only 1.00x in paired timing" in report["2"].reason
    assert report["2"].reason.endswith("kept every layer sparse, 2.00x dense in paired timing")
    assert "every layer sparse 1.80x as chosen in paired timing" in report.model
    torch.testing.assert_close(deployed(X), model(X), atol=1e-5, rtol=1e-5)


def test_views_a_later_module_refuses_make_the_outputs_contiguous(monkeypatch):
    _timing(monkeypatch, {"dense": 1.0, "contiguous outputs": 1.0})
    model = nn.Sequential(*sparse_mlp(), Rotary()).eval()
    with pytest.raises(RuntimeError, match="stride 1"):
        to_sparse(model, layout="csr")(X)  # a fixed layout keeps the views
    deployed = to_sparse(model, X)
    report = deployed.deploy_report
    assert report.chosen() == {"0": "csr", "2": "csr"}
    assert "as chosen failed (RuntimeError: Tensor must have a last dimension" in report.model
    assert report.model.endswith("kept contiguous outputs, 1.00x dense in paired timing")
    assert deployed[0].contiguous_output and deployed[2].contiguous_output
    torch.testing.assert_close(deployed(X), model(X), atol=1e-5, rtol=1e-5)


def test_when_no_variant_runs_the_layers_stay_dense(monkeypatch):
    _timing(monkeypatch, {})
    monkeypatch.setattr(model_round, "_runs", lambda variant, x: "RuntimeError: refused")
    deployed = to_sparse(sparse_mlp(), X)
    assert deployed.deploy_report.chosen() == {"0": "dense", "2": "dense"}
    assert deployed.deploy_report.model == (
        "model round on example_inputs (as chosen failed (RuntimeError: refused); contiguous "
        "outputs failed (RuntimeError: refused)): the deployed model failed: these layers "
        "were put back dense")


def test_no_round_with_a_fixed_layout_or_nothing_to_deploy(monkeypatch):
    def forbidden(*args):
        raise AssertionError("the model round ran")

    monkeypatch.setattr(model_round, "time_candidates", forbidden)
    assert to_sparse(sparse_mlp(), layout="csr").deploy_report.model == ""
    dense = nn.Sequential(nn.Linear(64, 8))  # no zeros: no layer to deploy
    assert to_sparse(dense, X).deploy_report.model == ""
