import logging
import pickle
import warnings

import pytest
import torch
from torch.ao.pruning._experimental.data_scheduler import BaseDataScheduler as RefScheduler
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefDNS

from prunekit import WeightNormSparsifier
from prunekit.data import BaseDataScheduler, DataNameError, DataNormSparsifier, data_norm_mask
from prunekit.errors import ConfigTypeError


def halving(base):
    class Halving(base):
        def get_schedule_param(self):
            return {
                name: config[self.schedule_param] * 0.5
                for name, config in self.data_sparsifier.data_groups.items()
            }

    return Halving


def data():
    torch.manual_seed(0)
    return [("a", torch.randn(4, 8)), ("b", torch.randn(8, 8))]


def test_schedule_matches_the_reference():
    ours_sparsifier = DataNormSparsifier(data(), sparsity_level=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_sparsifier = RefDNS(data(), sparsity_level=0.8)
        ref = halving(RefScheduler)(ref_sparsifier, "sparsity_level")
    ours = halving(BaseDataScheduler)(ours_sparsifier, "sparsity_level")
    assert ours.base_param == ref.base_param == {"a": 0.8, "b": 0.8}
    for _ in range(3):
        ours_sparsifier.step()
        ref_sparsifier.step()
        ours.step()
        ref.step()
        assert torch.equal(ours_sparsifier.get_mask("b"), ref_sparsifier.get_mask("b").bool())
    assert ours.get_last_param() == ref.get_last_param() == {"a": 0.05, "b": 0.05}
    assert ours._step_count == ref._step_count == 4
    assert ours_sparsifier._step_count == ref_sparsifier._step_count == 3
    assert ours.last_epoch == ref.last_epoch == 3
    assert "Halving" in repr(ours) and "sparsity_level: {'a': 0.8, 'b': 0.8}" in repr(ours)


def test_warns_when_the_scheduler_steps_first():
    s = DataNormSparsifier(data())
    scheduler = halving(BaseDataScheduler)(s, "sparsity_level")
    assert scheduler._step_count == 1 and s.data_groups["a"]["sparsity_level"] == 0.25
    with pytest.warns(UserWarning, match="before `data_sparsifier.step\\(\\)`"):
        scheduler.step()


def test_type_errors():
    with pytest.raises(ConfigTypeError, match="WeightNormSparsifier is not an instance of"):
        halving(BaseDataScheduler)(WeightNormSparsifier(), "sparsity_level")
    with pytest.raises(ConfigTypeError, match="schedule_param must be a config key"):
        halving(BaseDataScheduler)(DataNormSparsifier(), 0.5)


def test_unknown_names_are_rejected_before_writing():
    class Bad(BaseDataScheduler):
        def get_schedule_param(self):
            return {"a": 0.1, "zzz": 0.2}

    s = DataNormSparsifier(data())
    with pytest.raises(DataNameError, match="unknown data names \\['zzz'\\]"):
        Bad(s, "sparsity_level")
    assert s.data_groups["a"]["sparsity_level"] == 0.5


def test_state_dict_round_trip_and_verbose_logging(caplog):
    s = DataNormSparsifier(data(), sparsity_level=0.8)
    scheduler = halving(BaseDataScheduler)(s, "sparsity_level", verbose=True)
    s.step()
    s.enable_mask_update = False
    with caplog.at_level(logging.INFO, logger="prunekit"):
        scheduler.step()
    assert s.enable_mask_update
    assert "adjusting sparsity_level for data a to 0.2" in caplog.text
    sd = scheduler.state_dict()
    assert "data_sparsifier" not in sd and sd["_step_count"] == 2
    other = halving(BaseDataScheduler)(DataNormSparsifier(data()), "sparsity_level")
    other.load_state_dict(sd)
    assert other.last_epoch == 1 and other.base_param == {"a": 0.8, "b": 0.8}


def test_a_scheduled_sparsifier_still_pickles():
    s = DataNormSparsifier(data(), sparsity_level=0.8)
    scheduler = halving(BaseDataScheduler)(s, "sparsity_level")
    s.step()
    scheduler.step()
    copied = pickle.loads(pickle.dumps(s))
    copied.step()
    assert copied.data_groups["a"]["sparsity_level"] == 0.2
    assert torch.equal(copied.get_mask("a"), data_norm_mask(data()[0][1], 0.2, (1, 4)))
