"""A fused kernel whose launch does not fit the device runs as its torch reference, logged once.

The Triton kernels are sized for an H100's 227 KB of shared memory per block. A smaller device
(an A100 allows 164 KB per block) or an unusual model (more than 64 query heads per key head
at head dim 128, for the screen) asks for more, and Triton raises ``OutOfResources`` at the
launch, before anything is written. The op then computes the same result with its torch
reference (slower, exact to float32) instead of failing deep in a kernel, says so once at
WARNING on the ``sa_compile`` logger, and counts every such call in
``counters["sa_compile"]["torch path: <op>"]``. Example::

    out = kernel_or_reference("screen_ranking_keys", (HG, D), lambda: kernel(...), lambda: reference(...))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

log = logging.getLogger("sa_compile")

_UNFIT: set[tuple[str, Hashable]] = set()  # (op, launch key) pairs whose kernel did not fit


def kernel_or_reference(op: str, launch_key: Hashable, kernel: Callable | str, reference: Callable,
                        unfit: tuple[type[BaseException], ...] | None = None):
    """``kernel()``, or ``reference()`` once ``kernel()`` raised one of ``unfit`` (by default
    Triton's ``OutOfResources``) for this ``(op, launch_key)`` (remembered: later calls go
    straight to the reference). ``kernel`` may instead be a string, the reason the kernel
    cannot serve this launch at all."""
    from torch._dynamo.utils import counters

    key = (op, launch_key)
    if key not in _UNFIT:
        error = kernel
        if not isinstance(kernel, str):
            if unfit is None:
                from triton.runtime.errors import OutOfResources

                unfit = (OutOfResources,)
            try:
                return kernel()
            except unfit as raised:
                error = raised
        _UNFIT.add(key)
        log.warning("sa_compile: the fused %s kernel does not serve this launch (%s; %s); "
                    "its torch reference runs instead: same result, slower", op, error, launch_key)
    counters["sa_compile"][f"torch path: {op}"] += 1
    return reference()
