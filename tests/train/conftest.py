"""Training tests run single-threaded: tiny models gain nothing from a second thread, and on a
busy machine OpenMP threads spinning against each other make them many times slower."""
from __future__ import annotations

import typing as tp

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> tp.Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
