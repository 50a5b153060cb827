"""The torch.compile backend: sa_compile's graph passes, then Inductor."""

from __future__ import annotations

import torch
from torch._inductor.compile_fx import compile_fx

from .config import SparseConfig


def _inductor_patches(example_inputs) -> dict:
    on_gpu = any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    # Inductor's CPU FlexAttention template rejects epilogue fusion (torch 2.11-2.13).
    return {} if on_gpu else {"epilogue_fusion": False}


def make_backend(config: SparseConfig | None = None):
    """A torch.compile backend that runs causal attention sparse under ``config``.

    Example::

        cfg = SparseConfig(density=0.05)
        model = torch.compile(model, backend=make_backend(cfg))
    """
    if config is None:
        config = SparseConfig()
    if not isinstance(config, SparseConfig):
        raise ValueError(f"make_backend expects a SparseConfig, got {type(config).__name__}")
    if config.patterns is not None:
        from .patterns import load_table

        table = load_table(config.patterns)  # a bad table fails here, not mid-compile
        if table.block_size != config.block_size:
            raise ValueError(f"SparseConfig.block_size={config.block_size} differs from the pattern table's "
                             f"block_size={table.block_size} ({config.patterns!r})")

    def sa_compile_backend(gm: torch.fx.GraphModule, example_inputs):
        from sa_compile.passes import run_passes

        gm = run_passes(gm, example_inputs, config=config)
        return compile_fx(gm, example_inputs, config_patches=_inductor_patches(example_inputs))

    sa_compile_backend.config = config
    return sa_compile_backend


backend = make_backend()
"""The backend at the default :class:`SparseConfig`: ``torch.compile(model, backend=sa_compile.backend)``."""
