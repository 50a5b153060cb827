"""The torch.compile backend: sa_compile's graph passes, then Inductor."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

from .config import SparseConfig
from . import eligibility


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
    patches = inductor_options(mode, options, on_cpu=eligibility.on_cpu(example_inputs))
    return compile_fx(gm, example_inputs, config_patches=patches)


try:  # Dynamo re-raises these as they are; it wraps anything else a backend raises
    from torch._dynamo.exc import ShortenTraceback as _PassedThrough
except ImportError:  # pragma: no cover
    _PassedThrough = Exception


class OptionError(_PassedThrough, ValueError):
    """A bad ``options`` entry or SparseConfig field, raised from inside torch.compile.

    Dynamo wraps what a backend raises in a ``BackendCompilerFailed`` wall of its own frames;
    an exception of its ``ShortenTraceback`` kind reaches the user as raised. This one is a
    ``ValueError`` too, so ``except ValueError`` catches it."""

    def __init__(self, message: str, frame=None):
        try:  # the traceback shown starts at ``frame``, the backend's, not deep in Dynamo
            super().__init__(message, first_useful_frame=frame)
        except TypeError:  # pragma: no cover - a plain Exception base
            super().__init__(message)


def split_options(options: dict | None) -> tuple[dict, dict]:
    """``torch.compile``'s ``options`` split into SparseConfig fields and Inductor options.

    Raises ``ValueError`` listing the valid fields for a name that is neither. Example::

        split_options({"density": 0.1, "max_autotune": True})   # ({'density': 0.1}, {'max_autotune': True})
    """
    from torch._inductor import config as inductor_config

    fields = {f.name for f in dataclasses.fields(SparseConfig)}
    known = inductor_config.get_config_copy()
    sparse, other = {}, {}
    for key, value in (options or {}).items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in fields:
            sparse[name] = value
        elif name in known:
            other[key] = value
        else:
            raise ValueError(f"torch.compile option {key!r} is neither a SparseConfig field ({', '.join(sorted(fields))}) "
                             f"nor an Inductor option (torch._inductor.list_options() lists those)")
    return sparse, other


def configured(config: SparseConfig, fields: dict) -> SparseConfig:
    """``config`` with ``fields`` replaced, checked: a bad value raises SparseConfig's ``ValueError``."""
    if not fields:
        return config
    config = dataclasses.replace(config, **fields)
    _check_table(config)
    return config


def _check_table(config: SparseConfig) -> None:
    if config.patterns is not None:
        from .patterns import load_table

        table = load_table(config.patterns)  # a bad table fails here, not mid-compile
        if table.block_size != config.block_size:
            raise ValueError(f"SparseConfig.block_size={config.block_size} differs from the pattern table's "
                             f"block_size={table.block_size} ({config.patterns!r})")


def _counting(compiled_fn, tally):
    """``compiled_fn``, adding the graph's outcomes to ``counters["sa_compile"]`` at every call:
    under both entry points the counters count attention calls."""
    if not tally:
        return compiled_fn

    def counted(*args):
        totals = counters["sa_compile"]
        for key, count in tally.items():
            totals[key] += count
        return compiled_fn(*args)

    counted._boxed_call = getattr(compiled_fn, "_boxed_call", False)  # Inductor's takes its inputs as one list
    return counted


def make_backend(config: SparseConfig | None = None):
    """A torch.compile backend that runs causal attention sparse under ``config``.

    It takes torch.compile's ``mode`` and ``options``: SparseConfig field names in ``options``
    override ``config``, the rest go to Inductor for its compiles only (see
    :func:`inductor_options`). A name that is neither raises ``ValueError`` listing the fields.
    Example::

        model.compile(backend=make_backend(SparseConfig(density=0.05)), mode="max-autotune-no-cudagraphs")
        model.compile(backend="sa_compile", options={"density": 0.05, "min_seq_len": 4096})
    """
    if config is None:
        config = SparseConfig()
    if not isinstance(config, SparseConfig):
        raise ValueError(f"make_backend expects a SparseConfig, got {type(config).__name__}")
    _check_table(config)

    def sa_compile_backend(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
        from sa_compile.passes import run_passes

        try:  # checked before any rewrite
            fields, rest = split_options(options)
            graph_config = configured(config, fields)
            patches = inductor_options(mode, rest, on_cpu=eligibility.on_cpu(example_inputs))
        except ValueError as error:
            raise OptionError(str(error), inspect.currentframe()) from None
        gm = run_passes(gm, example_inputs, config=graph_config)
        tally = gm.meta.get("sa_compile")
        # Counted per call, so a compile Dynamo abandons and restarts (as under dynamic=True) counts nothing.
        return _counting(compile_fx(gm, example_inputs, config_patches=patches), tally)

    sa_compile_backend.config = config
    return sa_compile_backend


backend = make_backend()
"""The backend at the default :class:`SparseConfig`: ``torch.compile(model, backend=sa_compile.backend)``."""
