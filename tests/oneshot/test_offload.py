"""``oneshot(offload_folder=...)``: the calibration hidden states wait on disk, the
results are those of the in-memory run bit for bit, memory holds a few batches' hidden
states whatever the number of batches, and the folder is left as it was found."""

from __future__ import annotations

import copy
import gc
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from prunekit.oneshot import data
from tests.helpers import assert_unchanged, snapshot
from tests.oneshot.test_architectures import batches as gemma_batches
from tests.oneshot.test_architectures import decoder
from tests.oneshot.test_data import _real_packages
from tests.oneshot.test_dense_targets import Repeat

CALIBRATED = ("admm", "sparsegpt", "wanda")


def pruned(model: nn.Module, batches: list, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    prunekit.oneshot(model, batches, progress=False, **kwargs)
    return model


def assert_same(got: nn.Module, want: nn.Module) -> None:
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize("dense_targets", [False, True])
def test_offloading_changes_no_weight(llama, batches, tmp_path, method, dense_targets):
    kwargs = {"method": method, "dense_targets": dense_targets, "pattern": "2:4"}
    assert_same(pruned(llama, batches, offload_folder=tmp_path, **kwargs),
                pruned(llama, batches, **kwargs))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_blocks_with_inputs_of_their_own_move_on_through_them_offloaded(tmp_path, arch):
    model, data = decoder(arch), gemma_batches()
    kwargs = {"method": "sparsegpt", "dense_targets": True}
    assert_same(pruned(model, data, offload_folder=str(tmp_path), **kwargs),
                pruned(model, data, **kwargs))


def test_a_plain_stack_offloads_too(tmp_path):
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)])
    data = [torch.randn(8, 16) for _ in range(3)]
    kwargs = {"method": "wanda", "blocks": "", "dense_targets": True}
    assert_same(pruned(stack, data, offload_folder=tmp_path, **kwargs),
                pruned(stack, data, **kwargs))


def hidden_tensors_alive(width: int) -> int:
    return sum(1 for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and o.dim() == 3 and o.shape[-1] == width)


@pytest.mark.parametrize("offload", [False, True])
def test_memory_holds_a_few_batches_hidden_states_not_all(llama, tmp_path, offload):
    """Counted at every 10th forward of a block (a count takes a while), with 12
    batches and dense targets (two streams): in memory, all 24 hidden states are alive
    (the check can fail); offloaded, only the ones in flight."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 96, (2, 16), generator=g) for _ in range(12)]
    model = copy.deepcopy(llama)
    calls, seen = [], []

    def count(*_: object) -> None:
        calls.append(None)
        if len(calls) % 10 == 0:
            seen.append(hidden_tensors_alive(32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gc sees torch's deprecated aliases
        for block in model.model.layers:
            block.register_forward_pre_hook(count)
        prunekit.oneshot(model, data, "sparsegpt", dense_targets=True, progress=False,
                         offload_folder=tmp_path if offload else None)
    if offload:
        assert max(seen) <= 8, max(seen)
    else:
        assert max(seen) >= 24, max(seen)


def test_the_folder_is_emptied_when_pruning_fails(tmp_path):
    """A failure half-way (control flow that depends on the data, which the dense
    targets cannot pair) leaves no file behind."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.Linear(8, 8), Repeat(float("inf")))
    plain = pruned(model, [x], method="wanda", blocks="", sparsity=0.9)
    with torch.no_grad():
        model[1].threshold = float(model[0](x).abs().sum() + plain[0](x).abs().sum()) / 2
    with pytest.raises(UnsupportedError, match=r"ran [12] times in the pruned block"):
        prunekit.oneshot(model, [x], "wanda", blocks="", sparsity=0.9, dense_targets=True,
                         offload_folder=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("folder", "error", "message"), [
    (3, ConfigTypeError, "offload_folder must be a path, got int 3"),
    ("missing", ConfigError, "offload_folder '.*missing' is not a directory"),
    ("file", ConfigError, "offload_folder '.*file' is not a directory"),
])
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_a_bad_folder_is_refused_before_any_change(llama, batches, tmp_path, folder, error,
                                                   message, method):
    """Also by ``magnitude``, which has nothing to offload: the argument is wrong all
    the same."""
    (tmp_path / "file").write_text("")
    if isinstance(folder, str):
        folder = tmp_path / folder
    model = copy.deepcopy(llama)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        prunekit.oneshot(model, batches, method, offload_folder=folder, progress=False)
    assert_unchanged(before, model)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_it_cannot_write_in_is_refused(llama, batches):
    """/proc is a directory nobody, root included, can make one in."""
    model = copy.deepcopy(llama)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="cannot write in offload_folder '/proc'"):
        prunekit.oneshot(model, batches, offload_folder="/proc", progress=False)
    assert_unchanged(before, model)


class Keywords(nn.Module):
    """A block called with keywords only, none of them hidden_states."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_inputs_with_no_hidden_states_to_offload_are_refused(tmp_path):
    model = Keywords()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"offload_folder: .*hidden states.*keywords \[.x.\]"):
        prunekit.oneshot(model, [{"x": torch.randn(4, 8)}], "wanda", blocks=None,
                         offload_folder=tmp_path, progress=False)
    assert_unchanged(before, model)
    assert not any(tmp_path.iterdir())


def test_offloaded_records_behave_as_a_list_of_independent_records(tmp_path):
    from prunekit.oneshot.engine import BlockInput
    from prunekit.oneshot.offload import OffloadedInputs

    mask = torch.ones(4)
    big = torch.randn(1000, 8)
    records = OffloadedInputs(tmp_path / "a")
    for i in range(3):
        records.append(BlockInput((big[i:i + 2], mask), {"k": i}))
    assert len(records) == 3 and torch.equal(records[-1].args[0], big[2:4])
    assert records[1].args[1] is mask and records[1].kwargs == {"k": 1}
    assert (tmp_path / "a" / "0.pt").stat().st_size < big.nbytes / 4  # the view, not all of big
    twin = records.copy_to(tmp_path / "b")
    moved = records[0]
    moved.replace_hidden(torch.zeros(2, 8))
    records[0] = moved
    assert torch.equal(records[0].args[0], torch.zeros(2, 8))
    assert torch.equal(twin[0].args[0], big[:2])  # the copy did not move
    assert [r.kwargs["k"] for r in twin] == [0, 1, 2]
    assert all(r.args[0] is None for r in records._records)  # nothing kept in memory


@pytest.mark.slow
@pytest.mark.skipif(not _real_packages(), reason="needs the llm extra and the data packages")
def test_smollm2_prunes_to_the_same_weights_offloaded(tmp_path):
    """Real sizes (576 wide, 512-token batches), where kernels may take other paths on
    tensors loaded from disk: still the same bits."""
    model, tokenizer = data.load_smollm2()
    model.model.layers = model.model.layers[:2]
    calibration, _ = data.split_texts(data.wiki_summaries())
    calib = data.token_batches(tokenizer, calibration, 16, 512)
    kwargs = {"method": "sparsegpt", "dense_targets": True, "exact_update": True}
    assert_same(pruned(model, calib, offload_folder=tmp_path, **kwargs),
                pruned(model, calib, **kwargs))
