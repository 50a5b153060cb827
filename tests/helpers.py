"""Tolerances, inputs and a tiny model for the sa_compile tests (the references are in sa_compile.reference)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# Tolerances of a sparse/compiled output against a float64 reference computed from the
# same (dtype-rounded) inputs. Low-precision kernels round P and the output to the dtype.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


# CUDA runs the compiled tests too when a GPU is present; Triton's FlexAttention kernels
# want sparse blocks of at least 128 there, so lengths scale with the block.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BLOCK = {"cpu": 16, "cuda": 128}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def sqnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    noise = (actual.double() - reference.double()).pow(2).mean()
    return float(10 * torch.log10(reference.double().pow(2).mean() / noise))


def tiny_llama(head_dim: int = 16, layers: int = 2, dtype=torch.float32, seed: int = 0, **config_overrides):
    """A random GQA Llama (4 query heads, 2 key/value heads) small enough to compile in seconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, vocab_size=128, max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config_overrides})).to(dtype).eval()


def attention_inputs(seed: int, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype,
                     device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module, for the tests of the benchmark scripts themselves
    (every reference they measure against is in :mod:`sa_compile.reference`). The scripts are
    not a package: each runs as ``python benchmarks/<name>.py``, where Python puts the
    script's folder first on ``sys.path`` and its helpers import from there. Here it is loaded
    from its file the same way. Example::

        fidelity = benchmark_script("fidelity")
    """
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    if name not in sys.modules:
        path = Path(folder) / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
