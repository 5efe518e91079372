"""to_sparse: choices, equivalence with the dense model, report, and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.deploy import LAYOUTS, SparseConv1x1, SparseLinear, native, to_sparse
from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.parametrization import FakeSparsity
from tests.deploy._models import block_sparse, sparse_mlp
from tests.helpers import assert_unchanged, snapshot

X = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0))  # whatever ran first


@pytest.mark.parametrize(
    ("layout", "block", "expected"),
    [
        ("csr", (1, 1), "csr"),
        ("bsr", (4, 4), "bsr4x4"),
        ("row_blocks", (1, 4), "row_blocks1x4"),
        ("row_blocks", (4, 4), "row_blocks4x4"),
        ("row_blocks", (1, 1), "row_blocks1x1"),
        ("dense", (1, 1), "dense"),
    ],
)
def test_fixed_layouts_match_the_dense_model(layout, block, expected):
    model = sparse_mlp(block)
    deployed = to_sparse(model, layout=layout)
    torch.testing.assert_close(deployed(X), model(X), atol=1e-5, rtol=1e-5)
    assert deployed.deploy_report.chosen() == {"0": expected, "2": expected}
    assert type(model[0]) is nn.Linear  # the input model is untouched (a copy was deployed)


def test_auto_keeps_the_fastest_and_explains_it():
    model = sparse_mlp((16, 16), sparsity=0.95)
    deployed = to_sparse(model, X)
    torch.testing.assert_close(deployed(X), model(X), atol=1e-5, rtol=1e-5)
    first = deployed.deploy_report["0"]
    assert {"dense", "csr"} < set(first.times_ms)
    assert any(k.startswith("bsr") for k in first.times_ms)
    sparse_ms = {k: v for k, v in first.times_ms.items() if k != "dense"}
    # the layer's round keeps dense or its fastest sparse layout, which then beat dense;
    # the model round may put a layer kept dense into that fastest sparse layout too
    assert first.layout in ("dense", min(sparse_ms, key=sparse_ms.get))
    assert first.reason.startswith(("fastest:", "no layout beats dense"))
    assert any(s.startswith("semi_structured: ") and "CUDA" in s for s in first.skipped)
    sparsity = (model[0].weight == 0).float().mean().item()
    row = f"| 0 | Linear | 128x64 | {sparsity:.2f} | {first.layout} |"
    assert row in str(deployed.deploy_report)


def test_auto_leaves_layers_dense_when_sparse_cannot_win():
    deployed = to_sparse(sparse_mlp(sparsity=0.9), X, margin=0.99)
    assert deployed.deploy_report.chosen() == {"0": "dense", "2": "dense"}
    assert all(type(m) is not SparseLinear for m in deployed.modules())
    assert "no layout beats dense by 99%" in deployed.deploy_report["2"].reason


@pytest.mark.parametrize(("paired", "kept"), [(1.0, "dense"), (50.0, "csr")])
def test_auto_keeps_a_pick_only_if_paired_timing_confirms_the_margin(monkeypatch, paired, kept):
    """The interleaved round says CSR is 10x faster; the paired look decides."""
    import prunekit.deploy.convert as convert
    import prunekit.deploy.model_round as model_round

    monkeypatch.setattr(convert, "time_candidates", lambda c, x: {"dense": 1.0, "csr": 0.1})
    monkeypatch.setattr(convert, "confirmed_speedup", lambda dense, sparse, x: paired)
    monkeypatch.setattr(model_round, "confirmed_speedup", lambda dense, sparse, x: 1.0)
    model = sparse_mlp(sparsity=0.9)
    deployed = to_sparse(model, X, margin=0.1)
    report = deployed.deploy_report["0"]
    assert report.layout == kept
    assert f"{paired:.2f}x in paired timing" in report.reason
    torch.testing.assert_close(deployed(X), model(X), atol=1e-5, rtol=1e-5)


def test_paired_samples_time_both_in_every_block():
    from prunekit.deploy.auto import confirmed_speedup, paired_samples

    fast, slow = nn.Identity(), nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    x = torch.randn(64, 256)
    fast_s, slow_s = paired_samples(fast, slow, x, blocks=4, sample_s=1e-3)
    assert len(fast_s) == len(slow_s) == 4 and min(fast_s) > 0
    assert max(fast_s) < min(slow_s)
    assert confirmed_speedup(slow, fast, x, blocks=2) > 1


class _Clock:
    """A stand-in for ``time.perf_counter`` that moves only when a model says it took
    time, so timing logic is tested exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    import prunekit.deploy.auto as auto

    fake = _Clock()
    monkeypatch.setattr(auto, "time", SimpleNamespace(perf_counter=fake))
    return fake


class _Counting(nn.Module):
    """Identity that counts its calls and takes ``cost_s`` of the clock each."""

    def __init__(self, clock: _Clock, cost_s: float) -> None:
        super().__init__()
        self.clock, self.cost_s, self.calls = clock, cost_s, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.clock.now += self.cost_s
        return x


def test_timing_runs_every_model_the_same_number_of_calls_sized_on_the_slowest(clock):
    """Samples of unequal length would bias the ratio by the first calls' slowdown."""
    from prunekit.deploy.auto import paired_samples, time_candidates

    ms = 2.0**-10  # about a millisecond, and exact in binary: call counts are exact
    x = torch.randn(2, 4)
    fast, slow = _Counting(clock, ms / 8), _Counting(clock, 2 * ms)
    paired_samples(fast, slow, x, blocks=2, sample_s=10 * ms)
    # sizing: 1 + 1 call each; warm-up: 1 sample each; 2 ABBA blocks: 4 samples each,
    # every sample 1 untimed call + the 5 that the slower runs in 10 ms
    assert fast.calls == slow.calls == 2 + 1 * (1 + 5) + 2 * 2 * (1 + 5)
    models = {"dense": _Counting(clock, ms / 8), "csr": _Counting(clock, 2 * ms),
              "bsr": _Counting(clock, 0.0)}  # fmt: skip
    times = time_candidates(models, x, budget_s=30 * ms, sample_s=10 * ms, min_samples=3)
    assert {m.calls for m in models.values()} == {2 + 3 * (1 + 5)}
    assert times == {"dense": 1e3 * ms / 8, "csr": 1e3 * 2 * ms, "bsr": 0.0}


class _SlowAfterSwitch(nn.Module):
    """Takes 1 ms a call, 2 ms for the first three calls after another module ran."""

    def __init__(self, clock: _Clock, last: list[nn.Module]) -> None:
        super().__init__()
        self.clock, self.last, self.since_switch = clock, last, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last[0] is not self:
            self.last[0], self.since_switch = self, 0
        self.since_switch += 1
        self.clock.now += 2e-3 if self.since_switch <= 3 else 1e-3
        return x


def test_paired_blocks_cancel_the_cost_of_a_switch(clock):
    """Equal models: a single AB pair would favour whichever ran second (it runs after
    itself in ABBA); each block's mean gives both the same time."""
    from prunekit.deploy.auto import confirmed_speedup, paired_samples

    last: list[nn.Module] = [nn.Identity()]
    a, b = _SlowAfterSwitch(clock, last), _SlowAfterSwitch(clock, last)
    a_s, b_s = paired_samples(a, b, torch.zeros(1), blocks=3, sample_s=5e-3)
    assert a_s == pytest.approx(b_s) and len(a_s) == 3
    assert confirmed_speedup(a, b, torch.zeros(1)) == pytest.approx(1.0)


def test_auto_reports_layers_the_inputs_never_reach():
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp, self.unused = sparse_mlp(), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)

    model = WithSpare()
    with torch.no_grad():
        model.unused.weight[0] = 0
    deployed = to_sparse(model, X)
    assert deployed.deploy_report["unused"].reason == "not called by example_inputs"
    assert [c.fqn for c in deployed.deploy_report.layers] == ["mlp.0", "mlp.2", "unused"]
    assert type(deployed.unused) is nn.Linear


def test_layers_without_zeros_are_left_dense_unless_named():
    model = nn.Sequential(nn.Linear(16, 16))
    assert to_sparse(model, layout="csr").deploy_report["0"].reason == "no zeros in the weight"
    named = to_sparse(model, layout="csr", modules=["0"])
    assert isinstance(named[0], SparseLinear)


def test_pointwise_convs_are_deployed_and_other_convs_skipped():
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 8, 3))
    with torch.no_grad():
        model[0].weight.copy_(block_sparse(32, 16, (4, 4), 0.75).reshape(32, 16, 1, 1))
        model[1].weight[0] = 0
    deployed = to_sparse(model, layout="bsr")
    assert isinstance(deployed[0], SparseConv1x1) and type(deployed[1]) is nn.Conv2d
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)


def test_masked_modules_are_read_through_their_parametrization():
    model = nn.Sequential(nn.Linear(32, 32))
    mask = block_sparse(32, 32, (4, 4), 0.5) != 0
    parametrize.register_parametrization(model[0], "weight", FakeSparsity(mask))
    deployed = to_sparse(model, layout="bsr")
    x = torch.randn(3, 32)
    torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)
    assert deployed.deploy_report["0"].layout == "bsr4x4"


def test_blocksize_comes_from_sparse_params_then_the_argument():
    model = sparse_mlp((4, 4))
    model[0].sparse_params = {"sparse_block_shape": (2, 2)}
    deployed = to_sparse(model, layout="bsr")
    assert deployed.deploy_report.chosen() == {"0": "bsr2x2", "2": "bsr4x4"}
    assert to_sparse(model, layout="bsr", blocksize=(4, 4)).deploy_report["0"].layout == "bsr4x4"


def test_inplace_replaces_the_modules_of_the_given_model():
    model = sparse_mlp()
    same = to_sparse(model, layout="csr", inplace=True)
    assert same is model and isinstance(model[0], SparseLinear)


def test_a_partly_deployed_model_deploys_the_rest_on_a_copy():
    """to_sparse deep-copies the model first, deployed layers (CSR buffers) included."""
    first = to_sparse(sparse_mlp(), layout="csr", modules=["0"])
    second = to_sparse(first, layout="csr")
    assert isinstance(second[2], SparseLinear) and isinstance(first[2], nn.Linear)
    assert second[0].weight is not first[0].weight
    torch.testing.assert_close(second(X), first(X))


def test_state_dict_of_a_deployed_model_round_trips():
    source = to_sparse(sparse_mlp((4, 4)), layout="bsr")
    other = to_sparse(sparse_mlp((4, 4), sparsity=0.5), layout="bsr")
    other.load_state_dict(source.state_dict())
    torch.testing.assert_close(other(X), source(X))


def test_export_of_a_deployed_model():
    deployed = to_sparse(sparse_mlp(), layout="csr")
    program = torch.export.export(deployed, (X,))
    torch.testing.assert_close(program.module()(X), deployed(X))


BAD = [
    (dict(layout="bsr", blocksize=(3, 4)), ConfigError, r"'0' \(Linear \(128, 64\)\).*not divide"),
    (dict(layout="bsr"), ConfigError, r"layer '0'.*no block structure"),
    (dict(layout="semi_structured"), ConfigError, r"layer '0'.*needs a CUDA weight"),
    (dict(layout="coo"), ConfigError, r"layout='coo'; expected 'auto' or one of \['bsr', 'csr'"),
    (dict(layout="auto"), ConfigError, r"needs example_inputs .*got None"),
    (dict(layout="csr", modules=["1"]), ConfigTypeError, r"layer '1' is a GELU; expected nn.L"),
    (dict(layout="csr", modules=["9"]), FqnError, r"modules names '9'"),
    (dict(layout="csr", margin=1.5), ConfigError, r"margin=1.5; expected 0 <= margin < 1"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, message):
    model = sparse_mlp()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        to_sparse(model, inplace=True, **kwargs)
    assert_unchanged(before, model)
    assert not hasattr(model, "deploy_report")


def test_a_later_layer_failing_leaves_earlier_layers_unreplaced():
    model = sparse_mlp((4, 4))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(32, 128) * (torch.rand(32, 128) > 0.9))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"layer '2'.*no block structure"):
        to_sparse(model, layout="bsr", inplace=True)
    assert_unchanged(before, model)


def test_non_float_weights_name_the_layer():
    model = sparse_mlp().to(torch.float64)
    model[0].weight = nn.Parameter(torch.ones(128, 64, dtype=torch.int32), requires_grad=False)
    before = snapshot(model)
    with pytest.raises(ConfigTypeError, match=r"layer '0'.*torch.int32"):
        to_sparse(model, layout="csr", inplace=True)
    assert_unchanged(before, model)


def test_every_registered_layout_is_reachable_by_name():
    assert set(LAYOUTS) == {"dense", "csr", "bsr", "row_blocks", "semi_structured"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_on_cuda_matches_dense():
    model = nn.Sequential(nn.Linear(128, 128)).half().cuda()
    with torch.no_grad():
        keep = torch.zeros(128, 32, 4, dtype=torch.bool, device="cuda")
        keep[..., :2] = True
        model[0].weight.mul_(keep.reshape(128, 128))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    deployed = to_sparse(model, layout="semi_structured")
    torch.testing.assert_close(deployed(x), model(x), atol=1e-2, rtol=1e-2)
    auto = to_sparse(model, x)
    assert "semi_structured" in auto.deploy_report["0"].times_ms


def test_non_contiguous_weights_are_packed_from_a_contiguous_copy():
    model = sparse_mlp()
    tied = nn.Parameter(model[0].weight.detach().T.contiguous().T)  # same values, other strides
    assert not tied.is_contiguous()
    model[0].weight = tied
    deployed = to_sparse(model, layout="csr")
    torch.testing.assert_close(deployed(X), model(X), atol=1e-5, rtol=1e-5)


def test_a_layout_whose_kernel_refuses_the_dtype_is_an_error_or_skipped_by_auto():
    model = sparse_mlp().to(torch.bfloat16)  # torch's CPU CSR/BSR kernels: no bfloat16
    before = snapshot(model)
    refused = r"layer '0'.*layout 'csr' failed to run: .*bfloat16.*float32 and float64 only"
    with pytest.raises(ConfigError, match=refused):
        to_sparse(model, layout="csr", inplace=True)
    assert_unchanged(before, model)
    deployed = to_sparse(model, X.to(torch.bfloat16))
    assert any("'csr' failed to run" in s for s in deployed.deploy_report["0"].skipped)
    assert not any(c.startswith(("csr", "bsr")) for c in deployed.deploy_report.chosen().values())


@pytest.mark.skipif(native.row_block_kernel_error() is not None, reason="no row-block kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", ["before", "after"])
def test_16_bit_models_run_on_row_blocks(dtype, cast):
    """Deployed from a 16-bit model, or cast after deploying (packed weights and bias
    follow ``.to``): the output is the dense 16-bit model's, up to summation order."""
    model = sparse_mlp((1, 4), sparsity=0.9)
    deployed = to_sparse(model.to(dtype) if cast == "before" else model, layout="row_blocks")
    deployed.to(dtype)
    assert deployed[0].weight.dtype == deployed[0].bias.dtype == dtype
    x = X.to(dtype)
    got = deployed(x)
    assert got.dtype == dtype
    # Both round the hidden layer to float16 on their own: a few ulps apart at the output
    # (worst of 300 random inputs: 2.7e-3 with atol = rtol; the default 1e-3 failed 3%).
    tolerance = {"atol": 5e-3, "rtol": 5e-3} if dtype == torch.float16 else {}
    torch.testing.assert_close(got, model.to(dtype)(x), **tolerance)
