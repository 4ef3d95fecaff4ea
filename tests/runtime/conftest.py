"""Fixtures of the runtime tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Token-by-token passes on a tiny model are all per-op overhead; with 2 threads on a loaded 2-core machine,
    SDPA alone took ~7 ms a call (vs ~10 us with 1 thread).  A module that marks itself
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
