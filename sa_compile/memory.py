"""Prefill memory: run each decoder layer's MLP over the prompt in pieces.

At long context the MLP's hidden activations are the largest transient tensors of a
prefill: for Llama-3.1-8B, gate and up projections of 128K tokens take 3.5 GiB each
(1.75 GiB per rank under two-way tensor parallelism), beside a KV cache that grows with
every layer. Splitting the sequence into ``chunks`` pieces runs the MLP on one piece at a
time, so only one piece's activations are alive; the output is the same up to float
rounding, because the MLP acts on each token alone::

    model = chunk_mlp(model, chunks=4)          # before torch.compile; works with tensor_parallel
    model = torch.compile(model, backend=sa_compile.backend)
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _chunked_forward(self, x_BNE: torch.Tensor) -> torch.Tensor:
    if x_BNE.shape[-2] < self._sa_compile_chunk_min_tokens:
        return self._sa_compile_unchunked_forward(x_BNE)
    # tensor_split always returns ``chunks`` pieces, so the graph does not depend on N.
    pieces = torch.tensor_split(x_BNE, self._sa_compile_chunks, dim=-2)
    return torch.cat([self._sa_compile_unchunked_forward(p) for p in pieces], dim=-2)


def chunk_mlp(model: nn.Module, chunks: int = 4, min_tokens: int = 16384) -> nn.Module:
    """Make every decoder layer's MLP of a Hugging Face Llama run over ``chunks`` pieces of
    the sequence when the prompt has at least ``min_tokens`` tokens. Modifies ``model`` in
    place and returns it. Shorter inputs (decode steps included) run the MLP whole.
    """
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunk_mlp: chunks={chunks!r} is invalid: expected an integer >= 1")
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise ValueError(f"chunk_mlp: min_tokens={min_tokens!r} is invalid: expected an integer >= 0")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise TypeError(f"chunk_mlp: expected a Hugging Face Llama (model.model.layers[i].mlp), got "
                        f"{type(model).__name__}")
    for layer in layers:
        mlp = layer.mlp
        if not hasattr(mlp, "_sa_compile_unchunked_forward"):
            mlp._sa_compile_unchunked_forward = mlp.forward
            mlp.forward = types.MethodType(_chunked_forward, mlp)
        mlp._sa_compile_chunks = chunks
        mlp._sa_compile_chunk_min_tokens = min_tokens
    return model
