"""The verb for the common case: one call, and a model runs its prefill sparse.

    sa_compile.sparsify_(model)                                   # default SparseConfig
    sa_compile.sparsify_(model, SparseConfig(density=0.1))        # or a dict of its fields
    model.generate(**inputs)                                      # the prefill runs sparse, decode dense
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .compile_backend import make_backend
from .config import SparseConfig

log = logging.getLogger("sa_compile")


def as_config(config) -> SparseConfig:
    """A :class:`SparseConfig` from ``None`` (the default), a SparseConfig, or a dict of its fields.

    A name that is not a field raises ``ValueError`` listing the fields. Example::

        as_config({"density": 0.1})   # SparseConfig(density=0.1, ...)
    """
    if config is None:
        return SparseConfig()
    if isinstance(config, SparseConfig):
        return config
    if isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(SparseConfig)}
        unknown = sorted(str(name) for name in config if name not in fields)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a SparseConfig field; the fields are {', '.join(sorted(fields))}")
        return SparseConfig(**config)
    raise ValueError(f"config must be a SparseConfig, a dict of its fields or None, got {type(config).__name__}")


def sparsify_(model: torch.nn.Module, config=None, **compile_kwargs) -> torch.nn.Module:
    """Make ``model`` run causal prefill sparse, in place, for ``model(...)`` and ``model.generate(...)``.

    It compiles the whole model in place (``nn.Module.compile``) with the sa_compile backend, so
    every call of the model, ``generate()``'s included, runs the compiled forward; a Hugging Face
    model is switched to ``attn_implementation="sdpa"``, the attention the backend rewrites.
    ``compile_kwargs`` go to ``torch.compile`` (``dynamic``, ``mode``, ``options``). Returns
    ``model``. Example::

        sa_compile.sparsify_(model, SparseConfig(density=0.1))
        tokens = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=32)
    """
    from torch._dynamo.eval_frame import OptimizedModule

    config = as_config(config)
    if isinstance(model, OptimizedModule):
        raise ValueError("sparsify_ takes the model itself, not torch.compile's wrapper: the wrapper's "
                         "generate() would run the uncompiled model")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"sparsify_ expects a torch.nn.Module, got {type(model).__name__}")
    if "backend" in compile_kwargs:
        raise ValueError("sparsify_ chooses the backend; pass a SparseConfig instead")
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "sdpa"):
        log.info("sa_compile: switching attn_implementation from %r to 'sdpa'", implementation)
        model.set_attn_implementation("sdpa")
    model.compile(backend=make_backend(config), **compile_kwargs)
    return model
