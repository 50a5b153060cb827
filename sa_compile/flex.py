"""FlexAttention as the traced graph needs it.

The public ``flex_attention`` only emits its fused kernel when Dynamo traces it; called
while AOTAutograd traces an already-captured graph (which is where the backend's rewrite
runs) it would start a nested ``torch.compile``. There we call the higher-order op
directly, as Dynamo's trace of ``flex_attention`` does, with the mask's tensors passed
explicitly. Under Dynamo (``torch.compile(sparse_attention)``) the public function is the
way in, and Dynamo lifts the tensors the mask_mod closes over. Outside of compilation
either would ignore block sparsity, hence the guard.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.flex_attention import flex_attention as _flex_attention_hop
from torch.nn.attention.flex_attention import BlockMask, _apply_kernel_options, flex_attention


# Kernel options for FlexAttention on CUDA. ``USE_TMA`` loads the key and value tiles with
# Hopper's tensor memory accelerator; Inductor turns it off where the device or the tensors'
# layout cannot use it (before sm_90, unaligned strides), so it is safe to ask for everywhere.
# On an H100, on the default's masks, its output is bitwise the same and the kernel 6% faster
# at 128K, 4% at 256K (docs/results.md, "The default at 128K and 256K").
CUDA_KERNEL_OPTIONS = {"USE_TMA": True}


def kernel_options_for(q_BHND) -> dict | None:
    """The FlexAttention kernel options sa_compile passes for ``q_BHND``'s device."""
    return dict(CUDA_KERNEL_OPTIONS) if q_BHND.is_cuda else None


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_valid_mask_mod(b, h, q_idx, kv_idx, kv_valid_BN):
    return (q_idx >= kv_idx) & (kv_valid_BN[b, kv_idx] != 0)


def is_tracing() -> bool:
    """True while Dynamo or AOTAutograd traces (where the fused kernel gets generated)."""
    if torch.compiler.is_compiling():
        return True
    from torch._guards import TracingContext

    return TracingContext.try_get() is not None


def flex_attention_traced(q_BHND, k_BGND, v_BGND, block_mask: BlockMask, scale: float, mask_buffers=()):
    """Block-sparse attention through FlexAttention's fused kernel (GQA-native)."""
    if not is_tracing():
        raise RuntimeError(
            "sa_compile's sparse attention must run under torch.compile: eager FlexAttention "
            "ignores block sparsity and would silently compute dense attention."
        )
    if torch.compiler.is_dynamo_compiling():
        mask_mod = block_mask.mask_mod
        block_mask.mask_mod = lambda b, h, q_idx, kv_idx: mask_mod(b, h, q_idx, kv_idx, *mask_buffers)
        return flex_attention(q_BHND, k_BGND, v_BGND, block_mask=block_mask, scale=scale, enable_gqa=True,
                              kernel_options=kernel_options_for(q_BHND))
    kernel_options = _apply_kernel_options(q_BHND, k_BGND, v_BGND, False, kernel_options_for(q_BHND))
    out, *_ = _flex_attention_hop(
        q_BHND, k_BGND, v_BGND, _identity_score, block_mask.as_tuple(), scale, kernel_options,
        (), tuple(mask_buffers),
    )
    return out
