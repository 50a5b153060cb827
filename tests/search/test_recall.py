"""Attention recall and the oracle (sa_compile.reference) against naive float64 references."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile import PatternKind, SparseConfig
from sa_compile.reference import block_recall, oracle_keep, selection_block_mask, token_mask, true_block_mass
from sa_compile.sparse_op import select_kept_blocks

from ..helpers import attention_inputs


def naive_block_mass(q, k, block_size):
    """Causal softmax in float64 over the whole N x N grid, summed into blocks."""
    N = q.shape[-2]
    k64 = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = q.double() @ k64.transpose(-1, -2) * q.shape[-1] ** -0.5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    nb = -(-N // block_size)
    probs = torch.nn.functional.pad(probs, (0, nb * block_size - N, 0, nb * block_size - N))
    return probs.unflatten(-1, (nb, block_size)).sum(-1).unflatten(-2, (nb, block_size)).sum(-2)


@pytest.mark.parametrize("seq_len", [64, 100, 129])
def test_chunked_block_mass_equals_the_naive_one(seq_len):
    q, k, _ = attention_inputs(0, 2, 4, 2, seq_len, 16, torch.float32)
    # chunk_bytes this small forces one block of query rows per chunk.
    mass = true_block_mass(q, k, block_size=16, scale=16**-0.5, chunk_bytes=1)
    torch.testing.assert_close(mass.double(), naive_block_mass(q, k, 16), atol=1e-5, rtol=1e-5)
    assert torch.allclose(mass.sum(-1)[..., :-1], torch.tensor(16.0)), "a full query block holds 16 units of mass"


def test_a_full_density_selection_has_recall_one():
    q, k, _ = attention_inputs(1, 1, 4, 2, 200, 16, torch.float32)
    keep = select_kept_blocks(q, k, SparseConfig(density=1.0, block_size=16, min_seq_len=0), 16**-0.5)
    mass = true_block_mass(q, k, 16, 16**-0.5)
    assert torch.allclose(block_recall(mass, keep), torch.ones(1, 4, dtype=torch.float64), atol=1e-12)
    partial = keep.clone()
    partial[..., -1, 0] = False  # drop one block that holds mass
    assert (block_recall(mass, partial) < 1 - 1e-6).all()


def test_the_oracle_keeps_the_heaviest_causal_blocks_at_the_given_counts():
    mass = torch.tensor([[5.0, 0.0, 0.0], [1.0, 3.0, 0.0], [2.0, 7.0, 1.0]])[None, None]
    keep = oracle_keep(mass, torch.tensor([[[1, 1, 2]]]))
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(keep[0, 0], expected)
    assert torch.equal(oracle_keep(mass, torch.tensor([[[9, 9, 9]]]))[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


@given(seed=st.integers(0, 2**16), density=st.sampled_from([0.1, 0.25, 0.5]),
       pattern=st.sampled_from(list(PatternKind)))
def test_oracle_recall_is_at_least_the_search_recall(seed, density, pattern):
    q, k, _ = attention_inputs(seed, 1, 4, 2, 160, 16, torch.float32)
    cfg = SparseConfig(density=density, block_size=16, min_seq_len=0, last_q=16, pattern=pattern)
    keep = select_kept_blocks(q, k, cfg, 16**-0.5)
    mass = true_block_mass(q, k, 16, 16**-0.5)
    best = oracle_keep(mass, keep.sum(-1))
    assert torch.equal(best.sum(-1), keep.sum(-1)), "the oracle must pay what the search pays"
    assert (block_recall(mass, best) >= block_recall(mass, keep) - 1e-9).all()


def test_selection_block_mask_computes_exactly_the_kept_blocks():
    """Rows without their diagonal block stay without it (unlike the op's own builder)."""
    seq_len, block = 80, 16
    keep = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(1, 2, 1, 1)
    keep[0, 0, 3, 3] = False
    keep[0, 1, 4, 1:3] = False
    mask = selection_block_mask(keep, block, seq_len)
    assert torch.equal(mask.to_dense().bool(), keep)
    dense_kept = mask.to_dense().bool().repeat_interleave(block, -1).repeat_interleave(block, -2)
    assert torch.equal(dense_kept & token_mask(torch.ones_like(keep), block, seq_len), token_mask(keep, block, seq_len))
