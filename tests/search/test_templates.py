"""Templates against naive loops, and the planted-structure cases each one is for."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile.templates.block_query import block_query_scores
from sa_compile.templates.block_sparse import pooled_block_scores
from sa_compile.templates.vertical_slash import (
    last_q_attention, row_vertical_mass, vertical_slash_block_scores, vertical_slash_scores,
)


def _naive_last_q(q, k, last_q, scale):
    B, H, N, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, min(last_q, N), N, dtype=torch.float64)
    for i, pos in enumerate(range(N - out.shape[2], N)):
        logits = q[:, :, pos].double()[..., None, :] @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
        out[:, :, i, : pos + 1] = torch.softmax(logits[..., 0, : pos + 1] * scale, -1)
    return out


@given(seed=st.integers(0, 2**16), n=st.integers(1, 70), last_q=st.integers(1, 20))
def test_last_q_attention_is_exact_causal_attention_of_the_last_queries(seed, n, last_q):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
    got = last_q_attention(q, k, last_q, 0.3)
    torch.testing.assert_close(got.double(), _naive_last_q(q, k, last_q, 0.3), atol=1e-6, rtol=1e-5)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 50), last_q=st.integers(1, 12))
def test_vertical_and_slash_are_column_and_diagonal_sums(seed, n, last_q):
    gen = torch.Generator().manual_seed(seed)
    last_q = min(last_q, n)
    attn = torch.rand(1, 1, last_q, n, generator=gen, dtype=torch.float64)
    vertical, slash = vertical_slash_scores(attn)
    torch.testing.assert_close(vertical, attn.sum(-2))
    expected = torch.zeros(n, dtype=torch.float64)
    for i in range(last_q):
        pos = n - last_q + i
        for key in range(pos + 1):
            expected[pos - key] += attn[0, 0, i, key]
    torch.testing.assert_close(slash[0, 0], expected)


def _planted(n=256, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, d, generator=gen) * 0.2
    k = torch.randn(1, 1, n, d, generator=gen) * 0.2
    return q, k


def test_vertical_slash_scores_rows_are_causal_distributions():
    q, k = _planted()
    scores = vertical_slash_block_scores(last_q_attention(q, k, 32, 32**-0.5), 32)
    assert scores.shape == (1, 1, 8, 8)
    assert torch.allclose(scores.sum(-1), torch.ones(1, 1, 8))
    assert (scores.triu(1) == 0).all() and (scores >= 0).all()


def test_vertical_slash_finds_a_heavy_column_and_a_local_band():
    q, k = _planted()
    k[..., 100, :] = q[..., -32:, :].mean(-2) * 40  # every last query attends to key 100
    scores = vertical_slash_block_scores(last_q_attention(q, k, 32, 32**-0.5), 32)[0, 0]
    for row in range(4, 8):
        assert scores[row, :row].argmax() == 100 // 32


def test_row_aware_columns_follow_only_the_rows_that_look_them_up():
    """The last queries look up one span: shared column scores send every row there, the
    row-aware ones only the rows whose queries do."""
    q, k = _planted()
    topic = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 2
    q[..., 224:, :] += topic
    k[..., 64:96, :] += topic
    attn = last_q_attention(q, k, 32, 32**-0.5)
    shared = vertical_slash_block_scores(attn, 32)[0, 0]
    row_aware = vertical_slash_block_scores(attn, 32, q, k, 32**-0.5)[0, 0]
    assert torch.allclose(row_aware.sum(-1), torch.ones(8)) and (row_aware.triu(1) == 0).all()
    assert row_aware[7, :7].argmax() == 2 and shared[7, :7].argmax() == 2
    for row in range(3, 7):
        assert shared[row, 2] > 0.5 and row_aware[row, 2] < 0.6 * shared[row, 2], row


@given(seed=st.integers(0, 2**16), blocks=st.integers(1, 5), group=st.sampled_from([1, 2]))
def test_row_vertical_mass_against_a_naive_loop(seed, blocks, group):
    block, d = 8, 16
    n = blocks * block
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * group, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64)
    vertical = torch.rand(1, 2 * group, n, generator=gen, dtype=torch.float64)
    got = row_vertical_mass(q, k, vertical, block, 0.25)
    for h in range(2 * group):
        k_h = k[0, h // group]
        k_means = k_h.unflatten(0, (blocks, block)).mean(1)
        columns = vertical[0, h].topk(blocks).indices
        for qb in range(blocks):
            q_mean = q[0, h, qb * block : (qb + 1) * block].mean(0)
            logits = [(q_mean @ k_means[kb] * 0.25 + math.log(block), kb) for kb in range(qb + 1)]
            logits += [(q_mean @ k_h[j] * 0.25, int(j) // block) for j in columns if int(j) // block <= qb]
            probs = torch.softmax(torch.stack([value for value, _ in logits]), 0)
            expected = torch.zeros(blocks, dtype=torch.float64)
            for p, (_, kb) in zip(probs, logits):
                expected[kb] += p
            torch.testing.assert_close(got[0, h, qb].double(), expected, atol=1e-5, rtol=1e-5)


def test_pooled_scores_find_a_retrieved_span():
    q, k = _planted()
    topic = torch.randn(32) * 2
    q[..., 192:, :] += topic
    k[..., 64:96, :] += topic
    scores = pooled_block_scores(q, k, 32, 32**-0.5)[0, 0]
    assert torch.allclose(scores.sum(-1), torch.ones(8))
    for row in range(6, 8):
        assert scores[row, :row].argmax() == 2


def naive_pooled_scores(q, k, block):
    """One query block at a time: softmax of its mean query against every causal key block's
    mean key (a short last block averages the tokens it has)."""
    B, H, N, _ = q.shape
    group = H // k.shape[1]
    starts = list(range(0, N, block))
    out = torch.zeros(B, H, len(starts), len(starts), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            k_means = [k[b, h // group, s : s + block].double().mean(0) for s in starts]
            for qb, s in enumerate(starts):
                q_mean = q[b, h, s : s + block].double().mean(0)
                logits = torch.stack([q_mean @ k_means[kb] * 0.25 for kb in range(qb + 1)])
                out[b, h, qb, : qb + 1] = torch.softmax(logits, 0)
    return out


@given(seed=st.integers(0, 2**16), n=st.integers(1, 80))
def test_pooled_scores_against_a_naive_loop(seed, n):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, n, 16, generator=gen), torch.randn(2, 2, n, 16, generator=gen)
    scores = pooled_block_scores(q, k, 16, 0.25)
    torch.testing.assert_close(scores.double(), naive_pooled_scores(q, k, 16), atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 70), block=st.sampled_from([4, 8, 16]))
def test_block_scores_spread_columns_and_diagonals_over_the_blocks_they_cross(seed, n, block):
    gen = torch.Generator().manual_seed(seed)
    last_q = min(5, n)
    attn = torch.rand(1, 1, last_q, n, generator=gen, dtype=torch.float64)
    vertical, slash = vertical_slash_scores(attn)
    nb = -(-n // block)
    expected = torch.zeros(nb, nb, dtype=torch.float64)
    for qb in range(nb):
        for kb in range(qb + 1):
            column_mass = vertical[0, 0, kb * block : (kb + 1) * block].sum()
            # share of the block's rows that a diagonal at offset d crosses
            crossing = sum(slash[0, 0, d] * max(0, block - abs(d - (qb - kb) * block)) / block for d in range(n))
            expected[qb, kb] = column_mass + crossing
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(vertical_slash_block_scores(attn, block)[0, 0], expected)


def _naive_block_query(q, k, block_size, scale):
    """Per query block, its mean query's softmax over all keys of the causal key blocks, summed per block."""
    B, H, N, D = q.shape
    group = H // k.shape[1]
    nb = -(-N // block_size)
    out = torch.zeros(B, H, nb, nb, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for qb in range(nb):
                mean_q = q[b, h, qb * block_size : (qb + 1) * block_size].double().mean(0)
                visible = min((qb + 1) * block_size, N)
                probs = torch.softmax(k[b, h // group, :visible].double() @ mean_q * scale, -1)
                for kb in range(qb + 1):
                    out[b, h, qb, kb] = probs[kb * block_size : (kb + 1) * block_size].sum()
    return out


@given(seed=st.integers(0, 2**16), n=st.integers(1, 90), block=st.sampled_from([8, 16]))
def test_block_query_scores_are_mean_query_softmax_summed_per_block(seed, n, block):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
    got = block_query_scores(q, k, block, 0.4)
    torch.testing.assert_close(got.double(), _naive_block_query(q, k, block, 0.4), atol=1e-6, rtol=1e-5)


def test_block_query_keeps_a_short_span_that_pooling_averages_away():
    """Four retrieved keys inside one block of 32: the block-query score ranks their block
    first for the retrieving rows; the pooled score, whose mean key dilutes them 8-fold, does not."""
    q, k = _planted(n=512, d=32)
    topic = torch.randn(32, generator=torch.Generator().manual_seed(5))
    topic = topic / topic.norm() * 32**0.5
    q[..., 384:, :] += topic
    k[..., 150:154, :] += 2 * topic
    rows = slice(12, 16)  # the query blocks of positions 384-511
    by_query = block_query_scores(q, k, 32, 32**-0.5)[0, 0, rows]
    pooled = pooled_block_scores(q, k, 32, 32**-0.5)[0, 0, rows]
    assert (by_query.argmax(-1) == 4).all() and (by_query[:, 4] > 0.5).all()
    assert (pooled[:, 4] < 0.5 * by_query[:, 4]).all()
