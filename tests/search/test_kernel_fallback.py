"""A fused kernel that does not fit the device: the op returns its torch reference's result,
says so once, counts it, and never hides any other error."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from sa_compile.templates import _fallback
from sa_compile.templates._fallback import kernel_or_reference
from sa_compile.templates.screened_query import (
    key_block_stats, screen_queries, screen_ranking_keys, screen_ranking_keys_reference,
)


class NoRoom(Exception):
    """Stands in for Triton's OutOfResources."""


def _raise(error):
    raise error


@pytest.fixture(autouse=True)
def fresh_state():
    _fallback._UNFIT.clear()
    counters.clear()
    yield
    _fallback._UNFIT.clear()


def test_a_kernel_that_fits_runs_and_is_not_counted():
    assert kernel_or_reference("op", 1, lambda: "kernel", lambda: "reference", unfit=(NoRoom,)) == "kernel"
    assert not counters["sa_compile"]


def test_an_unfit_launch_runs_the_reference_logs_once_and_counts_every_call(caplog):
    calls = []

    def kernel():
        calls.append(1)
        raise NoRoom("shared memory")

    with caplog.at_level(logging.WARNING, logger="sa_compile"):
        for _ in range(3):
            assert kernel_or_reference("op", (4, 128), kernel, lambda: "reference", unfit=(NoRoom,)) == "reference"
    assert len(calls) == 1  # remembered: the kernel is not tried again for this launch
    assert counters["sa_compile"]["torch path: op"] == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "shared memory" in warnings[0].getMessage()
    # Another launch of the same op is tried on its own.
    assert kernel_or_reference("op", (4, 64), lambda: "kernel", lambda: "reference", unfit=(NoRoom,)) == "kernel"


def test_a_launch_the_kernel_cannot_serve_is_named(caplog):
    with caplog.at_level(logging.WARNING, logger="sa_compile"):
        assert kernel_or_reference("op", "D=256", "head dim above 128", lambda: "reference") == "reference"
    assert "head dim above 128" in caplog.text
    assert counters["sa_compile"]["torch path: op"] == 1


def test_other_errors_propagate():
    with pytest.raises(ValueError):
        kernel_or_reference("op", 1, lambda: _raise(ValueError("a bug")), lambda: "reference", unfit=(NoRoom,))
    assert not _fallback._UNFIT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
def test_cuda_screen_with_128_heads_per_group_runs_the_reference():
    """128 query heads per key head at head dim 128 ask the screen kernel for ~295 KB of shared
    memory, more than an H100 or H200 has: the op returns the torch reference's keys, counted.
    (At head dim 64 the same grouping fits: an H100 ran it.)"""
    B, H, G, N, D, block, width = 1, 128, 1, 1024, 128, 128, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(B, G, N, D, generator=gen).to("cuda", torch.bfloat16)
    args = (screen_queries(q, G, block, D**-0.5), *key_block_stats(k, block), width)
    got = screen_ranking_keys(*args)
    assert counters["sa_compile"]["torch path: screen_ranking_keys"] == 1
    # The same float32 computation; cuBLAS may sum in another order from one call to the next.
    torch.testing.assert_close(got, screen_ranking_keys_reference(*args), atol=1e-3, rtol=1e-5)
