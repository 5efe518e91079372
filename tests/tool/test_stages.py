"""Pruning stages: layer selection, schedules, missing backends, the bench runner."""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import ConfigError, UnsupportedError
from prunekit.tool import bench, stages
from prunekit.tool.digits import DigitsCNN, load_digits
from prunekit.tool.stages import prunable_weights, unstructured_stage


def test_prunable_weights_by_type_and_ignore():
    model = DigitsCNN()
    assert prunable_weights(model) == ["features.0.weight", "features.3.weight",
                                       "classifier.1.weight", "classifier.3.weight"]
    assert prunable_weights(model, ["Linear"], ignore=["classifier.3"]) == ["classifier.1.weight"]
    assert prunable_weights(model, ignore=["features"]) == ["classifier.1.weight",
                                                            "classifier.3.weight"]


def test_exported_graphs_find_their_layers_from_the_ops():
    program = torch.export.export(DigitsCNN().eval(), (torch.randn(1, 1, 8, 8),))
    assert prunable_weights(program.module(), ["Conv2d"]) == ["features.0.weight",
                                                             "features.3.weight"]


def test_unstructured_stage_follows_a_cubic_schedule():
    model = DigitsCNN()
    seen = []
    levels = unstructured_stage(model, 0.8, steps=4, ignore=["classifier.3"],
                                between_steps=lambda step, level: seen.append((step, level)))
    assert levels == pytest.approx([0.8 * (1 - (3 / 4) ** 3), 0.8 * (1 - (2 / 4) ** 3),
                                    0.8 * (1 - (1 / 4) ** 3), 0.8])
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert float((model.features[3].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert int((model.classifier[3].weight == 0).sum()) == 0
    assert not hasattr(model.features[3], "parametrizations")  # squashed


def test_one_step_goes_straight_to_the_target():
    model = DigitsCNN()
    assert unstructured_stage(model, 0.5, steps=1) == [0.5]
    assert float((model.features[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_unstructured_stage_with_nothing_to_prune():
    with pytest.raises(UnsupportedError, match=r"no Conv1d layer left to prune after ignoring"):
        unstructured_stage(DigitsCNN(), 0.5, layer_types=["Conv1d"])


def test_missing_backend_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(stages._BACKENDS, "structured", (("prunekit.nothing_here", "prune"),))
    with pytest.raises(UnsupportedError) as info:
        stages.backend("structured")
    assert str(info.value) == ("structured stage: this prunekit installation has no "
                               "prunekit.nothing_here.prune; remove the structured stage or "
                               "upgrade prunekit")


def test_digits_split_is_seeded_and_disjoint():
    a, b = load_digits(seed=3), load_digits(seed=3)
    assert torch.equal(a.x_test, b.x_test) and len(a.y_train) + len(a.y_test) == 1797
    assert a.x_train.shape[1:] == (1, 8, 8) and float(a.x_train.max()) == 1.0


def test_bench_runner_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "a" / "b" / "c" / "bench.py"))
    with pytest.raises(ConfigError, match="no benchmarks/ folder found"):
        bench.find_root()
