"""sa_compile: dynamic per-head sparse attention for long-context prefill, as a torch.compile backend.

    model = torch.compile(model, backend=sa_compile.backend)
    model = torch.compile(model, backend=sa_compile.make_backend(sa_compile.SparseConfig(density=0.05)))
"""

from .backend import backend, make_backend
from .config import PatternKind, SparseConfig
from .sparse_op import sparse_attention

__all__ = ["PatternKind", "SparseConfig", "backend", "make_backend", "sparse_attention"]
__version__ = "0.1.0"
