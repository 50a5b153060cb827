"""sa_compile: dynamic per-head sparse attention for long-context prefill, as a torch.compile backend.

    sa_compile.sparsify_(model)                                  # then model(...) or model.generate(...)
    model.compile(backend=sa_compile.backend)                    # the same, spelled out
    model.compile(backend=sa_compile.make_backend(sa_compile.SparseConfig(density=0.05)))
    sa_compile.register()                                        # or: attn_implementation="sa_compile"

Names load on first use, so importing the package does no work.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "backend": "sa_compile.compile_backend",
    "chunk_mlp": "sa_compile.memory",
    "make_backend": "sa_compile.compile_backend",
    "PatternKind": "sa_compile.config",
    "PatternTable": "sa_compile.patterns",
    "register": "sa_compile.hf_attention",
    "SparseConfig": "sa_compile.config",
    "sparse_attention": "sa_compile.sparse_op",
    "sparsify_": "sa_compile.sparsify",
    "tensor_parallel": "sa_compile.distributed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sa_compile' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
