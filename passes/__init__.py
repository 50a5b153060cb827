"""FX graph passes run by the sa_compile backend, in order, each logged."""

from __future__ import annotations

import logging
import time

from torch.fx import GraphModule

from sa_compile.config import SparseConfig

from .sparse_sdpa import sparse_sdpa_pass

log = logging.getLogger("sa_compile")

PASSES = (sparse_sdpa_pass,)


def run_passes(gm: GraphModule, example_inputs, *, config: SparseConfig) -> GraphModule:
    """Run every pass of :data:`PASSES` on a Dynamo graph."""
    for graph_pass in PASSES:
        start = time.perf_counter()
        gm = graph_pass(gm, example_inputs, config=config)
        log.debug("sa_compile: %s took %.1f ms", graph_pass.__name__, 1e3 * (time.perf_counter() - start))
    return gm


__all__ = ["PASSES", "run_passes", "sparse_sdpa_pass"]
