import os

import pytest
import torch
from hypothesis import settings

# The profile's count is for the compile-heavy properties; the core ones (selection
# invariants, causality of the search) run at least 25 in every profile: tests/strategies.py.
settings.register_profile("ci", max_examples=6, deadline=None, derandomize=True)
settings.register_profile("nightly", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("SA_COMPILE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and reads its own counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
