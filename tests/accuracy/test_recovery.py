"""Recovery: masks survive momentum and weight decay, gradual pruning, distillation, fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao import pruning as ao
from torch.nn.utils import parametrize
from torch.nn.utils import prune as tprune

import prunekit
from prunekit.accuracy import distillation_loss, masked_tensors
from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.structured.engine import prune as structured_prune


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def _data(n: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    for x, y in _data()[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _masked_originals(model: nn.Module) -> list[torch.Tensor]:
    return [t[m == 0] for t, m in masked_tensors(model)]


def _pruned_with_momentum(opt_fn, keep: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train dense (momentum builds up), then prune and train on."""
    model = _model()
    opt = opt_fn(model.parameters())
    _train(model, opt)
    s = prunekit.WeightNormSparsifier(sparsity_level=0.7, sparse_block_shape=(1, 1))
    s.prepare(model, None)
    s.step()
    # prepare swaps weight for parametrizations.weight.original: the same Parameter object
    handle = prunekit.keep_masks(opt, model) if keep else None
    _train(model, opt)
    if handle is not None:
        handle.remove()
    return model, opt


@pytest.mark.parametrize(
    "opt_fn",
    [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
     lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01)],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_masked_weights_stay_exactly_zero_through_the_optimizer(opt_fn) -> None:
    drifted, _ = _pruned_with_momentum(opt_fn, keep=False)
    assert any(bool((t != 0).any()) for t in _masked_originals(drifted))  # the problem
    model, opt = _pruned_with_momentum(opt_fn, keep=True)
    assert all(bool((t == 0).all()) for t in _masked_originals(model))
    checked = 0
    for t, mask in masked_tensors(model):
        for state in (v for v in opt.state[t].values() if v.shape == t.shape):
            assert bool((state[mask == 0] == 0).all())
            checked += 1
    assert checked >= 2  # momentum buffers, or Adam's two moments


def test_keep_masks_follows_torch_ao_and_nn_utils_prune_masks() -> None:
    ref = _model()
    s = ao.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    s.prepare(ref, None)
    s.step()
    tp = _model()
    tprune.l1_unstructured(tp[0], "weight", amount=0.5)
    assert len(masked_tensors(ref)) == 2 and len(masked_tensors(tp)) == 1
    for model in (ref, tp):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        prunekit.keep_masks(opt, model)
        _train(model, opt)
        assert all(bool((t == 0).all()) for t in _masked_originals(model))
        for t, _ in masked_tensors(model):
            buf = opt.state[t]["momentum_buffer"]
            assert bool((buf[masked_mask(model, t)] == 0).all())


class _RowMask(nn.Module):
    """A structured-style parametrization: one keep flag per output row."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.view(-1, 1)


def test_keep_masks_broadcasts_row_masks() -> None:
    model = _model()
    rows = torch.tensor([True, False] * 16)
    parametrize.register_parametrization(model[0], "weight", _RowMask(rows))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _train(model, opt, steps=2)
    prunekit.keep_masks(opt, model)
    _train(model, opt, steps=2)
    original = model[0].parametrizations.weight.original
    assert bool((original[~rows] == 0).all()) and bool((original[rows] != 0).all())
    assert bool((opt.state[original]["momentum_buffer"][~rows] == 0).all())


def masked_mask(model: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return next(m == 0 for t, m in masked_tensors(model) if t is tensor)


def test_gradual_prune_reaches_the_target_and_logs_each_epoch() -> None:
    model = _model()
    s = prunekit.GlobalSparsifier(sparsity_level=0.8, score="lamp")
    s.prepare(model, None)
    sched = prunekit.CubicSL(s, init_sl=0.0, delta_t=1, total_t=8)  # 4 events an epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.cat([b[0] for b in _data()]), torch.cat([b[1] for b in _data()])
    log = prunekit.gradual_prune(model, _data(), opt, s, sched, epochs=3, prune_every=2,
                                 eval_fn=lambda m: float((m(x).argmax(1) == y).float().mean()))
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert set(log[0]) == {"epoch", "loss", "sparsity", "seconds", "metric"}
    assert log[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert log[0]["sparsity"] < log[-1]["sparsity"]
    assert all(bool((t == 0).all()) for t in _masked_originals(model))
    assert opt._optimizer_step_post_hooks == {}  # the hook is removed afterwards
    assert log[-1]["metric"] > 0.6


def test_distillation_loss_limits() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    target = torch.randint(0, 5, (8,), generator=g)
    ce = F.cross_entropy(student, target)
    assert torch.allclose(distillation_loss(student, teacher, target, alpha=0.0), ce)
    assert torch.allclose(distillation_loss(student, student, target, alpha=1.0),
                          torch.tensor(0.0), atol=1e-6)
    kl = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1),
                  reduction="batchmean")
    assert torch.allclose(distillation_loss(student, teacher, target, 1.0, 2.0), 4 * kl)


def test_finetune_after_structured_pruning_with_a_teacher_recovers() -> None:
    dense = _model()
    prunekit.finetune(dense, _data() * 2, epochs=2, lr=1e-2)
    model = copy.deepcopy(dense)
    structured_prune(model, torch.randn(2, 10), ratio=0.5).apply()
    assert model[0].out_features == 16
    x, y = torch.cat([b[0] for b in _data()]), torch.cat([b[1] for b in _data()])

    def acc(m: nn.Module) -> float:
        return float((m(x).argmax(1) == y).float().mean())

    before = acc(model)
    log = prunekit.finetune(model, _data() * 2, epochs=2, lr=1e-2, teacher=dense, eval_fn=acc)
    assert log[-1]["metric"] >= before
    assert log[-1]["metric"] > 0.7


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epochs": 0}, ConfigError, "epochs must be a positive int, got 0"),
        ({"prune_every": 0}, ConfigError, "prune_every must be a positive int, got 0"),
        ({"kd_alpha": 2.0}, ConfigError, "0 <= kd_alpha <= 1 and kd_temperature > 0"),
        ({"sparsifier": object()}, ConfigTypeError, "sparsifier must be a prunekit"),
    ],
)
def test_gradual_prune_bad_input(kwargs: dict, error: type, message: str) -> None:
    model = _model()
    s = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    s.prepare(model, None)
    before = copy.deepcopy(model.state_dict())
    args = {"sparsifier": s, **kwargs}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error) as info:
        prunekit.gradual_prune(model, _data(), opt, **args)
    assert message in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keep_masks_wants_an_optimizer() -> None:
    with pytest.raises(ConfigTypeError, match="optimizer must be a torch Optimizer, got list"):
        prunekit.keep_masks([], _model())


def _tiny_lm() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)
    return transformers.LlamaForCausalLM(config)


def test_finetune_scores_a_language_model_per_token() -> None:
    model, teacher = _tiny_lm(), _tiny_lm()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = (ids[:, :-1], ids[:, 1:])
    with torch.no_grad():
        student_logits = model(batch[0]).logits.reshape(-1, 64)
        teacher_logits = teacher(batch[0]).logits.reshape(-1, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    plain = prunekit.finetune(model, [batch], optimizer=optimizer)
    assert plain[0]["loss"] == pytest.approx(
        float(F.cross_entropy(student_logits, batch[1].reshape(-1))), rel=1e-5)
    distilled = prunekit.finetune(model, [batch], optimizer=optimizer, teacher=teacher,
                                  kd_alpha=0.7, kd_temperature=2.0)
    want = distillation_loss(student_logits, teacher_logits, batch[1].reshape(-1), 0.7, 2.0)
    assert distilled[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert teacher.training is False


def test_finetune_lowers_a_language_models_loss_and_refuses_unshifted_targets() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    log = prunekit.finetune(model, [(ids[:, :-1], ids[:, 1:])] * 8, epochs=3, lr=1e-2)
    assert log[-1]["loss"] < log[0]["loss"] * 0.8
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"targets of shape \(4, 15\) do not match logits "
                                          r"of shape \(4, 16, 64\)"):
        prunekit.finetune(model, [(ids, ids[:, 1:])], lr=1e-2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
