"""The FlexAttention kernel options sa_compile asks for: CUDA only, and no change to the output."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sa_compile.flex import causal_mask_mod, kernel_options_for


def test_cpu_gets_no_cuda_kernel_options():
    assert kernel_options_for(torch.zeros(1, 1, 16, 8)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_kernel_options_leave_the_output_unchanged():
    """TMA loads change how tiles reach shared memory, not the arithmetic: the same bits."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, block = 4096, 128
    q = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, 2, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    # A causal mask that keeps every other block below the diagonal: full and partial blocks both.
    sparse = lambda b, h, q_idx, kv_idx: causal_mask_mod(b, h, q_idx, kv_idx) & (  # noqa: E731
        ((q_idx // block - kv_idx // block) % 2 == 0) | (kv_idx < block))
    mask = create_block_mask(sparse, 1, 1, n, n, device="cuda", BLOCK_SIZE=block)
    run = torch.compile(lambda q, k, v, options: flex_attention(q, k, v, block_mask=mask, enable_gqa=True,
                                                                kernel_options=options), fullgraph=True)
    options = kernel_options_for(q)
    assert options, "CUDA gets sa_compile's kernel options"
    torch.testing.assert_close(run(q, k, v, options), run(q, k, v, None), rtol=0, atol=0)
