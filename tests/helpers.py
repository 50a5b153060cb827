"""Shared references and tolerances for the sa_compile tests."""

from __future__ import annotations

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


def token_mask(keep_BHQK: torch.Tensor, block_size: int, seq_len: int, kv_valid_BN=None) -> torch.Tensor:
    """The token-level mask a block selection stands for: kept blocks, causal, valid keys."""
    mask = keep_BHQK.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keep_BHQK.device).tril()
    mask = mask[..., :seq_len, :seq_len] & causal
    if kv_valid_BN is not None:
        mask = mask & (kv_valid_BN != 0)[:, None, None, :]
    return mask


def masked_reference(q, k, v, mask, scale=None) -> torch.Tensor:
    """Dense attention under ``mask`` in float64; rows with no visible key give zeros."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, 1)
    v64 = v.double().repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.double() @ k64.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ v64


def dense_reference(q, k, v, scale=None, kv_valid_BN=None) -> torch.Tensor:
    """Causal dense attention in float64 (optionally with key padding)."""
    N = q.shape[-2]
    mask = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()[None, None]
    if kv_valid_BN is not None:
        mask = mask & (kv_valid_BN != 0)[:, None, None, :]
    return masked_reference(q, k, v, mask, scale)


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
