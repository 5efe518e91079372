"""Every test starts from the same random state, whatever ran before it: a test's
random inputs do not change with the order or the selection of tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _same_random_state() -> None:
    torch.manual_seed(0)
