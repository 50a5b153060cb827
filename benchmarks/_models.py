"""The models the TTFT benchmark builds: a tiny Llama for the CPU and the Llama-3.1-8B
architecture with random weights, built straight on the device."""

from __future__ import annotations

import torch


def tiny_config(max_len: int):
    """A few-layer GQA Llama that compiles in seconds: 4 q heads, 2 kv heads, head dim 32."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=max(max_len, 4096), attn_implementation="sdpa",
    )


def llama31_8b_config():
    """The Llama-3.1-8B architecture (no weights: they are drawn at random)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        attn_implementation="sdpa",
    )


def _check_rotary(model) -> None:
    """The RoPE inverse frequencies must match a fresh float32 computation from the config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = model.model.rotary_emb
    if rotary.rope_type == "default":
        expected, _ = rotary.compute_default_rope_parameters(model.config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rotary.rope_type](model.config, device="cpu")
    got = rotary.inv_freq.detach().float().cpu()
    if rotary.inv_freq.dtype != torch.float32 or not torch.allclose(got, expected.float(), rtol=1e-6, atol=0):
        raise RuntimeError(f"rotary inv_freq is wrong ({rotary.inv_freq.dtype}); the model would not be Llama")


def build_model(name: str, device: torch.device, max_len: int):
    """Random-weight model built straight on ``device`` (no hub access, no CPU round trip).

    Building under ``torch.device(device)`` with the default dtype set makes every weight
    land on the GPU in its final dtype, and transformers' own init draws the normal(0, 0.02)
    weights there; the RoPE buffers are computed in float32 on the way (checked after).
    """
    from transformers import LlamaForCausalLM

    config, dtype = (tiny_config(max_len), torch.float32) if name == "tiny" else (llama31_8b_config(), torch.bfloat16)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected attn_implementation 'sdpa', got {model.config._attn_implementation!r}")
    _check_rotary(model)
    return model, dtype
