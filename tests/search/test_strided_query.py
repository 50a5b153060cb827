"""The strided-query template against a naive float64 loop, inside the compiled op, and its CUDA kernel."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile import PatternKind, SparseConfig
from sa_compile.sparse_op import dense_causal_attention, select_kept_blocks, sparse_attention
from sa_compile.templates.strided_query import (
    sample_positions, strided_block_mass, strided_block_mass_reference, strided_query_scores,
)

from ..helpers import assert_close, attention_inputs


def naive_strided_mass(q, k, kv_valid, block_size, stride, scale):
    """One sampled query at a time: its causal softmax over every valid key, summed per key block."""
    B, H, N, _ = q.shape
    nb = -(-N // block_size)
    k64 = k.double().repeat_interleave(H // k.shape[1], 1)
    mass = torch.zeros(B, H, nb, nb, dtype=torch.float64)
    for pos in range(stride - 1, nb * block_size, stride):
        if pos >= N:
            continue
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, pos].double(), k64[:, :, : pos + 1]) * scale
        if kv_valid is not None:
            logits = logits.masked_fill(kv_valid[:, None, : pos + 1] == 0, float("-inf"))
        probs = torch.softmax(logits, -1).nan_to_num(0.0)
        for kb in range(pos // block_size + 1):
            mass[:, :, pos // block_size, kb] += probs[:, :, kb * block_size:(kb + 1) * block_size].sum(-1)
    return mass


@given(seed=st.integers(0, 2**16), n=st.integers(1, 150), block=st.sampled_from([16, 32]),
       stride=st.sampled_from([1, 4, 16]), group=st.sampled_from([1, 2, 3]), padded=st.booleans(),
       chunk_bytes=st.sampled_from([1, 4096, 1 << 28]))
def test_reference_is_the_sampled_queries_exact_block_mass(seed, n, block, stride, group, padded, chunk_bytes):
    q, k, _ = attention_inputs(seed, 2, 2 * group, 2, n, 8, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    kv_valid = (torch.rand(2, n, generator=gen) > 0.3).long() if padded else None
    got = strided_block_mass_reference(q, k, kv_valid, block, stride, 0.4, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(got.double(), naive_strided_mass(q, k, kv_valid, block, stride, 0.4),
                               atol=1e-5, rtol=1e-5)


def test_samples_end_each_block_and_stride_one_is_the_true_mass():
    assert sample_positions(2, 16, 4, "cpu").tolist() == [[3, 7, 11, 15], [19, 23, 27, 31]]
    q, k, _ = attention_inputs(0, 1, 2, 1, 64, 8, torch.float32)
    scores = strided_query_scores(q, k, 16, 1, 0.5)
    causal_probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(
        torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf")), -1)
    true_mass = causal_probs.unflatten(-1, (4, 16)).sum(-1).unflatten(-2, (4, 16)).sum(-2)
    torch.testing.assert_close(scores, true_mass / true_mass.sum(-1, keepdim=True))


def test_scores_are_causal_row_distributions_that_find_a_planted_span():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 256, 32, generator=gen) * 0.3, torch.randn(1, 1, 256, 32, generator=gen) * 0.3
    topic = torch.randn(32, generator=gen)
    q[..., 192:, :] += topic
    k[..., 70:73, :] += 3 * topic  # three keys inside block 2 of 8
    scores = strided_query_scores(q, k, 32, 8, 32**-0.5)
    assert torch.allclose(scores.sum(-1), torch.ones(1, 1, 8))
    assert torch.all(scores.triu(1) == 0)
    assert torch.all(scores[0, 0, 6:].argmax(-1) == 2)


def test_fp16_inputs_with_huge_norms_give_finite_scores():
    q, k, _ = attention_inputs(1, 1, 2, 2, 64, 16, torch.float32)
    scores = strided_query_scores((q * 300).half(), (k * 300).half(), 16, 4, 0.25)
    assert torch.isfinite(scores).all()


def test_compiled_op_matches_the_eager_search_and_full_budget_is_dense():
    q, k, v = attention_inputs(2, 1, 4, 2, 200, 16, torch.float32)
    op = torch.compile(sparse_attention, dynamic=True)
    full = SparseConfig(density=1.0, block_size=16, min_seq_len=0, pattern=PatternKind.STRIDED_QUERY,
                        query_stride=4)
    assert_close(op(q, k, v, full), dense_causal_attention(q, k, v))
    sparse = SparseConfig(density=0.3, block_size=16, min_seq_len=0, pattern=PatternKind.STRIDED_QUERY,
                          query_stride=8)
    _, keep = op(q, k, v, sparse, return_keep=True)
    assert torch.equal(keep, select_kept_blocks(q, k, sparse, 16**-0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 4000, 128, 128, 16), (2, 9, 3, 1000, 64, 128, 8),
                                   (1, 4, 4, 700, 64, 64, 16)])
def test_cuda_kernel_matches_the_reference(dtype, shape):
    B, H, G, N, D, block, stride = shape
    q, k, _ = attention_inputs(3, B, H, G, N, D, dtype, device="cuda")
    kv_valid = torch.ones(B, N, dtype=torch.long, device="cuda")
    kv_valid[:, : N // 7] = 0  # left padding
    for valid in (None, kv_valid):
        got = strided_block_mass(q, k, valid, block, stride, D**-0.5)
        expected = strided_block_mass_reference(q, k, valid, block, stride, D**-0.5)
        # Low-precision logits differ between the kernel's and the matmul's accumulation order.
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
