"""The torch.compile backend: sa_compile's graph passes, then Inductor."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

from .config import SparseConfig


def _on_cpu(example_inputs) -> bool:
    return not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)


def inductor_options(mode: str | None = None, options: dict | None = None, *, on_cpu: bool = False) -> dict:
    """The Inductor config patches for torch.compile's ``mode`` and ``options``, checked.

    They are applied for this compile only (``compile_fx(config_patches=...)``). Raises
    ``ValueError`` naming a mode or option that Inductor does not know, or that sa_compile
    cannot honour. Example::

        inductor_options("max-autotune-no-cudagraphs")   # {'max_autotune': True, 'coordinate_descent_tuning': True}
        torch.compile(model, backend=sa_compile.backend, mode="max-autotune")   # where they come from
    """
    from torch._inductor import config, list_mode_options

    patches = {}
    if mode is not None and mode != "default":
        modes = list_mode_options()
        if mode not in modes:
            raise ValueError(f"torch.compile mode={mode!r} is unknown to Inductor: expected one of {sorted(modes)}")
        patches.update(list_mode_options(mode))
    known = config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"torch.compile option {key!r} is not an Inductor option "
                             f"(torch._inductor.list_options() lists them)")
        current = known[name]
        if current is not None and not isinstance(value, type(current)):
            raise ValueError(f"torch.compile option {key!r}={value!r}: expected a {type(current).__name__}")
        patches[name] = value
    if on_cpu:
        # Inductor's CPU FlexAttention template rejects epilogue fusion (torch 2.11-2.13).
        if patches.get("epilogue_fusion"):
            raise ValueError("torch.compile option 'epilogue_fusion'=True cannot be honoured on CPU: "
                             "Inductor's CPU FlexAttention template rejects epilogue fusion")
        patches["epilogue_fusion"] = False
    return patches


def inductor(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """Plain Inductor with sa_compile's device patches: a backend for code that is already sparse.

    Example::

        attn = torch.compile(sa_compile.sparse_attention, backend=inductor, dynamic=True)
    """
    patches = inductor_options(mode, options, on_cpu=_on_cpu(example_inputs))
    return compile_fx(gm, example_inputs, config_patches=patches)


def make_backend(config: SparseConfig | None = None):
    """A torch.compile backend that runs causal attention sparse under ``config``.

    It takes torch.compile's ``mode`` and ``options`` and hands them to Inductor for its
    compiles only (see :func:`inductor_options`). Example::

        cfg = SparseConfig(density=0.05)
        model = torch.compile(model, backend=make_backend(cfg), mode="max-autotune-no-cudagraphs")
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

    def sa_compile_backend(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
        from sa_compile.passes import run_passes

        patches = inductor_options(mode, options, on_cpu=_on_cpu(example_inputs))  # checked before any rewrite
        counted = counters["sa_compile"].copy()
        try:
            gm = run_passes(gm, example_inputs, config=config)
            return compile_fx(gm, example_inputs, config_patches=patches)
        except BaseException:
            # A compile that does not finish serves no call. Dynamo also restarts its trace
            # from inside compile_fx (under dynamic=True) and hands the backend the same
            # graph again: the abandoned attempt's counts would count every SDPA twice.
            counters["sa_compile"].clear()
            counters["sa_compile"].update(counted)
            raise

    sa_compile_backend.config = config
    return sa_compile_backend


backend = make_backend()
"""The backend at the default :class:`SparseConfig`: ``torch.compile(model, backend=sa_compile.backend)``."""
