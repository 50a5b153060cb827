"""The screened strided-query search: its candidates, their mass against a naive float64 loop,
the selection among them, the compiled op, and its CUDA kernel."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile import SparseConfig
from sa_compile.selection import blocks_per_row, keep_mask, select_candidate_lists
from sa_compile.sparse_op import dense_causal_attention, search_blocks, select_kept_blocks, sparse_attention
from sa_compile.templates.screened_query import (
    NO_BLOCK, candidate_block_mass, candidate_block_mass_reference, candidate_blocks, key_block_stats, key_stats,
    key_stats_reference, ranking_keys, screen_queries, screen_ranking_keys, screen_ranking_keys_reference, screen_scores,
    screened_query_lists, top_candidates,
)
from sa_compile.templates._blocks import dequantize_int8, quantize_int8
from sa_compile.templates.strided_query import strided_block_mass_reference

from ..helpers import assert_close, attention_inputs


def naive_int8(row):
    """One row rounded to int8 steps of its largest magnitude / 127, halves up, in float64."""
    step = row.abs().max() / 127
    return row if step == 0 else torch.floor(row / step + 0.5).clamp(-127, 127) * step


def naive_candidate_mass(q, k, kv_valid, cand, block_size, stride, scale, int8=False):
    """One sampled query at a time: its softmax over the valid causal keys of its row's
    candidate blocks, summed per candidate slot. ``int8``: the scaled query and every key
    rounded to int8 first."""
    B, H, N, _ = q.shape
    G, (nb, W) = k.shape[1], cand.shape[-2:]
    mass = torch.zeros(B, H, nb, W, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for pos in range(stride - 1, N, stride):
                qb = pos // block_size
                slots = [(w, int(cand[b, h // (H // G), qb, w])) for w in range(W)]
                keys = [(w, key) for w, kb in slots if 0 <= kb <= qb
                        for key in range(kb * block_size, min((kb + 1) * block_size, pos + 1))
                        if kv_valid is None or kv_valid[b, key] != 0]
                if not keys:
                    continue
                query = q[b, h, pos].double() * scale
                if int8:
                    query = naive_int8(query)
                rows = [k[b, h // (H // G), key].double() for _, key in keys]
                logits = torch.stack([query @ (naive_int8(row) if int8 else row) for row in rows])
                probs = torch.softmax(logits, 0)
                for (w, _), p in zip(keys, probs):
                    mass[b, h, qb, w] += p
    return mass


@given(seed=st.integers(0, 2**16), n=st.integers(1, 100), block=st.sampled_from([16, 32]),
       stride=st.sampled_from([1, 4, 16]), group=st.sampled_from([1, 3]), padded=st.booleans(),
       width=st.integers(1, 8), chunk_bytes=st.sampled_from([1, 1 << 28]), int8=st.booleans())
def test_candidate_mass_is_the_sampled_queries_exact_mass_over_candidates(seed, n, block, stride, group, padded,
                                                                          width, chunk_bytes, int8):
    q, k, _ = attention_inputs(seed, 1, 2 * group, 2, n, 8, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    kv_valid = (torch.rand(1, n, generator=gen) > 0.3).long() if padded else None
    nb = -(-n // block)
    # Any candidates, repeats excluded: random causal blocks, some slots empty.
    keys = torch.rand(1, 2, nb, nb, generator=gen).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), -1)
    top = keys.topk(min(width, nb), -1)
    cand = torch.where(top.values >= 0, top.indices, NO_BLOCK)
    k_in, k_scale = quantize_int8(k) if int8 else (k, None)
    got = candidate_block_mass_reference(q, k_in, k_scale, kv_valid, cand, block, stride, 0.4, chunk_bytes=chunk_bytes)
    expected = naive_candidate_mass(q, k, kv_valid, cand, block, stride, 0.4, int8)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 20), width=st.integers(1, 130),
       magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
def test_int8_rows_round_to_the_nearest_step_of_their_largest_value(seed, rows, width, magnitude):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[0] = 0.0  # a row of zeros: scale 0, every value 0
    if rows > 1:
        x[1, 0] = float("nan")  # non-finite values count as 0
        x[1, -1] = float("inf")
    x8, scale = quantize_int8(x)
    assert x8.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale[0] == 0 and torch.all(x8[0] == 0)
    finite = x.nan_to_num(0.0, 0.0, 0.0)
    back = dequantize_int8(x8, scale)
    assert torch.all(torch.isfinite(back))
    assert torch.all((back - finite).abs() <= scale[:, None] * 0.5001 + 1e-30 * magnitude)
    peak = finite.abs().argmax(-1, keepdim=True)
    nonzero = finite.abs().amax(-1) > 0
    assert torch.all(x8.gather(-1, peak).abs()[nonzero] == 127)


def test_int8_estimate_keeps_almost_the_same_blocks_as_the_exact_one():
    """On an input with real attention's structure (a positional band, a sink, retrieved
    spans) the int8 logits move almost no kept block, and every row stays causal."""
    B, H, G, N, D, block = 1, 4, 2, 2048, 32, 32
    gen = torch.Generator().manual_seed(7)
    pos_ND = torch.cos(torch.arange(N)[:, None] * torch.logspace(-3, 0, D))
    q = torch.randn(B, H, N, D, generator=gen) * 0.5 + pos_ND
    k = torch.randn(B, G, N, D, generator=gen) * 0.5 + pos_ND
    k[:, :, :16] *= 4  # a sink
    config = SparseConfig(block_size=block, taper_from=512, min_seq_len=0, candidates=2)
    exact = select_kept_blocks(q, k, replace(config, int8_estimate=False), D**-0.5)
    int8 = select_kept_blocks(q, k, config, D**-0.5)
    assert torch.equal(int8.sum(-1), exact.sum(-1))  # the same budget
    assert (int8 & ~exact).sum() <= 0.01 * exact.sum()
    assert not torch.any(int8 & torch.ones(N // block, N // block, dtype=torch.bool).triu(1))


@given(seed=st.integers(0, 2**16), n=st.integers(1, 200), width=st.integers(1, 12), padded=st.booleans())
def test_candidates_are_distinct_causal_blocks_led_by_diagonal_and_sink(seed, n, width, padded):
    block = 16
    q, k, _ = attention_inputs(seed, 2, 4, 2, n, 8, torch.float32)
    kv_valid = (torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) > 0.5).long() if padded else None
    screen = screen_scores(q, k, block, 0.3, kv_valid)
    cand = candidate_blocks(screen, width)
    nb = -(-n // block)
    assert cand.shape == (2, 2, nb, width)
    for qb in range(nb):
        row = cand[:, :, qb]
        assert torch.all(row[..., 0] == qb)
        if qb > 0 and width > 1:
            assert torch.all(row[..., 1] == 0)
        real = row >= 0
        # Every slot holds a causal block while the row has any left, and no block twice.
        assert torch.all(real.sum(-1) == min(width, qb + 1))
        assert torch.all((row <= qb) | ~real)
        for b in range(2):
            for g in range(2):
                blocks = row[b, g][real[b, g]].tolist()
                assert len(set(blocks)) == len(blocks)


def naive_screen(q, k, kv_valid, block_size, scale):
    """One query block and head at a time, in float64: the softmax of its mean query against
    each causal key block's mean key, plus the softmax of its bound (relu(q) . max(k) +
    min(q, 0) . min(k), over the block's valid keys), summed over the key head's query heads."""
    B, H, N, D = q.shape
    G = k.shape[1]
    nb = -(-N // block_size)
    screen = torch.zeros(B, G, nb, nb, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for qb in range(nb):
                qm = q[b, h, qb * block_size:(qb + 1) * block_size].double().mean(0) * scale
                means, bounds = [], []
                for kb in range(qb + 1):
                    keys = [t for t in range(kb * block_size, min((kb + 1) * block_size, N))
                            if kv_valid is None or kv_valid[b, t] != 0]
                    ks = k[b, g, keys].double()
                    means.append(qm @ ks.mean(0) if keys else torch.tensor(0.0, dtype=torch.float64))
                    bounds.append(qm.clamp(min=0) @ ks.amax(0) + qm.clamp(max=0) @ ks.amin(0) if keys
                                  else qm.clamp(min=0).sum() * -1e4 + qm.clamp(max=0).sum() * 1e4)
                screen[b, g, qb, :qb + 1] += torch.softmax(torch.stack(means), 0) + torch.softmax(torch.stack(bounds), 0)
    return screen


@given(seed=st.integers(0, 2**16), n=st.integers(1, 90), block=st.sampled_from([8, 16]),
       group=st.sampled_from([1, 3]), padded=st.booleans(), width=st.integers(1, 14))
def test_screen_ranking_keys_are_the_float64_screen_under_the_ranking_rules(seed, n, block, group, padded, width):
    """The op the search calls (the torch path off CUDA) against a float64 loop: causal keys
    are the screen; the diagonal ranks first (inf), the sink second (3e38), the blocks
    above the diagonal and ``width`` padding columns never (-inf)."""
    q, k, _ = attention_inputs(seed, 2, 2 * group, 2, n, 8, torch.float32)
    kv_valid = (torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) > 0.3).long() if padded else None
    keys = screen_ranking_keys(screen_queries(q, 2, block, 0.3), *key_block_stats(k, block, kv_valid), width)
    nb = -(-n // block)
    assert keys.shape == (2, 2, nb, nb + width)
    screen64 = naive_screen(q, k, kv_valid, block, 0.3)
    expected = ranking_keys(screen64, width)
    scored = torch.isfinite(expected) & (expected < 3e38)
    assert torch.equal(keys[~scored], expected[~scored])
    torch.testing.assert_close(keys[scored].double(), torch.nn.functional.pad(screen64, (0, width))[scored],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(top_candidates(keys, width), candidate_blocks(screen_scores(q, k, block, 0.3, kv_valid), width))


@given(seed=st.integers(0, 2**16), n=st.integers(1, 90), block=st.sampled_from([8, 16]),
       stride=st.sampled_from([1, 4, 8]), group=st.sampled_from([1, 3]))
def test_sampled_screen_means_are_the_float64_means_of_the_strided_sample(seed, n, block, stride, group):
    """Each block's mean over its queries at offsets stride-1, 2*stride-1, ...; a sample past
    the end of a short last block counts as the last query."""
    q, _, _ = attention_inputs(seed, 2, 2 * group, 2, n, 8, torch.float32)
    means = screen_queries(q, 2, block, 0.3, stride)
    nb = -(-n // block)
    expected = torch.zeros(2, 2 * group, nb, 8, dtype=torch.float64)
    for qb in range(nb):
        rows = [min(qb * block + offset, n - 1) for offset in range(stride - 1, block, stride)]
        expected[:, :, qb] = q[:, :, rows].double().mean(-2) * 0.3
    torch.testing.assert_close(means.double(), expected.reshape(2, 2, group * nb, 8), atol=1e-6, rtol=1e-6)
    if stride == 1 and n % block == 0:
        assert_close(means, screen_queries(q, 2, block, 0.3))


def test_compiled_op_with_sampled_screen_means_matches_the_eager_search():
    """The sampled means in the fused op (one dynamic graph, odd lengths); a full budget stays dense."""
    q, k, v = attention_inputs(3, 1, 4, 2, 300, 16, torch.float32)
    sparse = SparseConfig(density=0.3, block_size=16, min_seq_len=0, taper_from=64, candidates=2,
                          sampled_screen_means=True)
    op = torch.compile(lambda q, k, v: sparse_attention(q, k, v, sparse, return_keep=True))
    for n in (300, 250):
        _, keep = op(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        assert torch.equal(keep, select_kept_blocks(q[:, :, :n], k[:, :, :n], sparse, 16**-0.5))
        assert not keep.triu(1).any()
    full = replace(sparse, density=1.0, taper_from=512)  # no taper below 512 tokens
    assert_close(torch.compile(lambda q, k, v: sparse_attention(q, k, v, full))(q, k, v),
                 dense_causal_attention(q, k, v))


def test_screen_puts_a_planted_lookup_among_the_candidates():
    """Three keys of block 2 match the last queries: the bound sees them although block 2's mean does not."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 512, 32, generator=gen) * 0.3, torch.randn(1, 1, 512, 32, generator=gen) * 0.3
    topic = torch.randn(32, generator=gen)
    q[..., 448:, :] += topic
    k[..., 70:73, :] += 3 * topic
    cand = candidate_blocks(screen_scores(q, k, 32, 32**-0.5), 4)
    assert all(2 in cand[0, 0, qb].tolist() for qb in range(14, 16))


def test_selection_keeps_the_best_candidates_at_the_unscreened_counts():
    gen = torch.Generator().manual_seed(1)
    nb, width = 12, 6
    cand = candidate_blocks(torch.rand(1, 1, nb, nb, generator=gen), width)
    scores = torch.rand(1, 1, nb, width, generator=gen)
    order, count = select_candidate_lists(scores, cand, nb, 0.3)
    k = int(blocks_per_row(nb, 0.3, "cpu"))
    assert torch.equal(count[0, 0], torch.minimum(torch.tensor(k), torch.arange(nb) + 1))
    for qb in range(nb):
        kept = order[0, 0, qb, :count[0, 0, qb]].tolist()
        assert kept[0] == qb and (qb == 0 or kept[1] == 0)
        others = [(float(scores[0, 0, qb, w]), int(cand[0, 0, qb, w])) for w in range(2, width) if cand[0, 0, qb, w] >= 0]
        assert kept[2:] == [b for _, b in sorted(others, reverse=True)][:len(kept) - 2]
    assert keep_mask(order, count).sum(-1).equal(count)


def test_candidates_holding_every_causal_block_rank_like_the_unscreened_search():
    """With a slot for every causal block, the candidates' mass is the strided mass (logits in the
    inputs' dtype: the strided template has no int8 form)."""
    q, k, _ = attention_inputs(4, 1, 4, 2, 300, 16, torch.float32)
    scores, blocks = screened_query_lists(q, k, 32, 8, 0.25, width=10, int8_estimate=False)
    full = strided_block_mass_reference(q, k, None, 32, 8, 0.25)
    gathered = full.gather(-1, blocks.clamp(min=0)) * (blocks >= 0)
    assert_close(scores, gathered / gathered.sum(-1, keepdim=True))


def test_search_uses_the_screen_past_its_width_and_stays_causal():
    config = SparseConfig(density=0.3, block_size=16, min_seq_len=0, taper_from=64, candidates=2)
    width = config.candidate_width()
    q, k, _ = attention_inputs(5, 1, 4, 2, 400, 16, torch.float32)
    order, count = search_blocks(q, k, config, 0.25)
    assert order.shape[-1] == width < order.shape[-2]
    keep = select_kept_blocks(q, k, config, 0.25)
    assert not keep.triu(1).any() and keep.diagonal(dim1=-2, dim2=-1).all() and keep[..., 1:, 0].all()
    assert torch.equal(keep.sum(-1), count)


def test_compiled_screened_op_matches_the_eager_search_and_full_budget_is_dense():
    # The candidates' width is a shape computed from the config: the config's fields stay
    # constants (literals in the graph the backend rewrites; here, compiled without
    # dynamic=True, which would make them symbolic); the second length makes shapes dynamic.
    q, k, v = attention_inputs(2, 1, 4, 2, 300, 16, torch.float32)
    full = SparseConfig(density=1.0, block_size=16, min_seq_len=0, taper_from=512, candidates=1)
    assert full.candidate_width() is not None
    op = torch.compile(lambda q, k, v: sparse_attention(q, k, v, full))
    assert_close(op(q, k, v), dense_causal_attention(q, k, v))
    sparse = SparseConfig(density=0.3, block_size=16, min_seq_len=0, taper_from=64, candidates=2)
    op = torch.compile(lambda q, k, v: sparse_attention(q, k, v, sparse, return_keep=True))
    for n in (300, 250):  # a second length: one dynamic graph
        _, keep = op(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        assert torch.equal(keep, select_kept_blocks(q[:, :, :n], k[:, :, :n], sparse, 16**-0.5))


def test_config_width_is_the_taper_rows_count_times_candidates():
    config = SparseConfig(density=0.3, block_size=128, taper_from=32768, candidates=3)
    kept = int(blocks_per_row(256, 0.3, "cpu"))
    assert config.candidate_width() == 3 * kept
    assert SparseConfig().candidate_width() == 164  # on by default: 4 x the 41 blocks a row keeps at 32K
    assert SparseConfig(candidates=None).candidate_width() is None
    assert SparseConfig(candidates=3, taper_from=None).candidate_width() is None
    assert SparseConfig(candidates=3, pattern="block_query").candidate_width() is None
    with pytest.raises(ValueError, match="candidates"):
        SparseConfig(candidates=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 4000, 128, 128, 8, 40), (2, 9, 3, 1000, 64, 128, 8, 5),
                                   (1, 4, 4, 700, 64, 64, 16, 3)])
def test_cuda_kernel_matches_the_reference(dtype, shape):
    B, H, G, N, D, block, stride, width = shape
    q, k, _ = attention_inputs(3, B, H, G, N, D, dtype, device="cuda")
    all_ones = torch.ones(B, N, dtype=torch.long, device="cuda")  # every tile skips the padding mask
    kv_valid = all_ones.clone()
    kv_valid[:, : N // 7] = 0  # left padding: some tiles masked, some not
    for valid in (None, all_ones, kv_valid):
        cand = candidate_blocks(screen_scores(q, k, block, D**-0.5, valid), width)
        for k_in, k_scale in ((k, None), quantize_int8(k)):
            got = candidate_block_mass(q, k_in, k_scale, valid, cand, block, stride, D**-0.5)
            expected = candidate_block_mass_reference(q, k_in, k_scale, valid, cand, block, stride, D**-0.5)
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_key_stats_op_returns_the_stats_and_int8_keys_eager_and_compiled(int8, padded):
    """The op the search calls: the screen's block statistics and (with ``int8``) the int8 keys,
    with the shapes its fake promises under dynamic shapes (odd lengths, a short last block)."""
    run = torch.compile(key_stats, dynamic=True, fullgraph=True)
    for N in (300, 517):
        _, k, _ = attention_inputs(N, 1, 4, 2, N, 16, torch.float32)
        valid = None
        if padded:
            valid = torch.ones(1, N, dtype=torch.long)
            valid[:, :70] = 0  # left padding: the first block has no valid key
        expected = (*key_block_stats(k, 64, valid), *(quantize_int8(k) if int8 else (torch.empty(0),) * 2))
        for got in (key_stats(k, valid, 64, int8), run(k, valid, 64, int8)):
            assert len(got) == 5
            for a, b in zip(got, expected):
                assert a.shape == b.shape and (a.numel() == 0 or a.dtype == b.dtype)
                torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8, 4000, 128, 128), (2, 3, 1000, 64, 64), (1, 1, 700, 48, 32)])
def test_cuda_key_stats_kernel_matches_the_reference(dtype, shape):
    """One read of the keys for the screen's statistics and the int8 keys: the mean within float
    rounding, max and min and the scales exact, the int8 keys within one step (a division
    rounded differently) on a few keys at most."""
    from sa_compile.templates._screen_triton import key_stats_cuda

    B, G, N, D, block = shape
    _, k, _ = attention_inputs(9, B, 2 * G, G, N, D, dtype, device="cuda")
    k[0, 0, 5] = 0  # a zero key: scale 0
    left = torch.ones(B, N, dtype=torch.long, device="cuda")
    left[:, : N // 3] = 0  # left padding: whole blocks without a valid key
    for valid in (None, left):
        for int8 in (True, False):
            got = key_stats_cuda(k, valid, block, int8)
            expected = key_stats_reference(k, valid, block, int8)
            for name, a, b in zip(("mean", "max", "min", "k8", "scale"), got, expected):
                assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
            for a, b in zip(got[1:3], expected[1:3]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            if int8:
                torch.testing.assert_close(got[4], expected[4], rtol=0, atol=0)
                steps = (got[3].int() - expected[3].int()).abs()
                assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_kernel_keeps_its_output_under_a_register_cap(padded):
    """The int8 launch's default register cap (128) changes where values live, not the arithmetic:
    the same output as the compiler's own choice (``maxnreg=0``), with and without a key mask."""
    from sa_compile.templates._screened_triton import candidate_block_mass_cuda

    B, H, G, N, D, block, stride, width = 1, 32, 8, 4000, 128, 128, 8, 40
    q, k, _ = attention_inputs(6, B, H, G, N, D, torch.bfloat16, device="cuda")
    valid = torch.ones(B, N, dtype=torch.long, device="cuda") if padded else None
    cand = candidate_blocks(screen_scores(q, k, block, D**-0.5, valid), width)
    k8, k_scale = quantize_int8(k)
    args = (q, k8, k_scale, valid, cand, block, stride, D**-0.5)
    torch.testing.assert_close(candidate_block_mass_cuda(*args), candidate_block_mass_cuda(*args, maxnreg=0),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
@pytest.mark.parametrize("width", [1, 2, 41, 164, 300])
def test_cuda_candidate_order_matches_the_stable_sort(width):
    """The in-register sort against the stable sort it replaces, exactly: ties (scores in
    quarters, 0.0 beside -0.0), negative scores, NaN, +-inf and scores past the key limit,
    rows with empty slots."""
    from sa_compile.selection import _KEY_LIMIT, order_candidates, order_candidates_reference
    from sa_compile.templates._screened_triton import order_candidates_cuda

    gen = torch.Generator().manual_seed(width)
    shape = (2, 3, 50, width)
    for ties in (False, True):
        scores = torch.rand(shape, generator=gen)
        scores = (scores * 4).floor() / 4 if ties else scores
        u = torch.rand(shape, generator=gen)
        scores[u < 0.05] = float("nan")
        scores[(u >= 0.05) & (u < 0.08)] = float("inf")
        scores[(u >= 0.08) & (u < 0.1)] = float("-inf")
        scores[(u >= 0.1) & (u < 0.12)] = 1e35
        scores[(u >= 0.12) & (u < 0.15)] *= -1
        scores[(u >= 0.15) & (u < 0.2)] = -0.0 if ties else 0.0
        live = torch.randint(0, width + 1, (*shape[:-1], 1), generator=gen)
        blocks = torch.where(torch.arange(width) < live, torch.randint(0, 60, shape, generator=gen), -1)
        expected = order_candidates_reference(scores, blocks)
        got = order_candidates_cuda(scores.cuda(), blocks.cuda(), _KEY_LIMIT)
        assert torch.equal(got.cpu(), expected)
        assert torch.equal(order_candidates(scores.cuda(), blocks.cuda()).cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 20000, 128, 128, 123), (2, 9, 3, 3000, 64, 64, 10),
                                   (1, 4, 4, 700, 64, 16, 3), (1, 6, 1, 5000, 96, 128, 40),
                                   (1, 8, 2, 70000, 64, 128, 41)])  # 547 blocks: 4 warps by default
@pytest.mark.parametrize("launch", [{}, {"num_warps": 4}])
def test_cuda_screen_kernel_matches_the_float32_screen(dtype, shape, launch):
    """The fused screen (TF32 dots) against the torch path in float32: the same ranking rules
    in the same places, scores within TF32's error, and (almost) the same candidates. Inputs
    with real attention's structure (a positional band and a sink), where the screen's
    ranking is not a tie among noise. Also at 4 warps, which the default launch takes from 512-block grids."""
    from sa_compile.templates._screen_triton import screen_ranking_keys_cuda

    B, H, G, N, D, block, width = shape
    gen = torch.Generator().manual_seed(N)
    pos_ND = torch.cos(torch.arange(N)[:, None] * torch.logspace(-3, 0, D))
    q = (torch.randn(B, H, N, D, generator=gen) + pos_ND).to("cuda", dtype)
    k = (torch.randn(B, G, N, D, generator=gen) + pos_ND).to("cuda", dtype)
    kv_valid = torch.ones(B, N, dtype=torch.long, device="cuda")
    kv_valid[:, : N // 7] = 0  # left padding
    for valid in (None, kv_valid):
        args = (screen_queries(q, G, block, D**-0.5), *key_block_stats(k, block, valid), width)
        got, expected = screen_ranking_keys_cuda(*args, **launch), screen_ranking_keys_reference(*args)
        scored = torch.isfinite(expected) & (expected < 3e38)
        assert torch.equal(got[~scored], expected[~scored])
        torch.testing.assert_close(got[scored], expected[scored], atol=2e-3, rtol=2e-3)
        # A row's candidates lead its list and its empty slots trail: a kept-block list.
        proposed, wanted = (keep_mask(c, (c >= 0).sum(-1)) for c in (top_candidates(got, width),
                                                                      top_candidates(expected, width)))
        assert (proposed & wanted).sum() >= 0.995 * wanted.sum()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("width", [3, 9, 40])
def test_block_mask_lists_are_grid_wide_and_alike_whatever_the_candidates_width(width, padded):
    """torch 2.11's CUDA FlexAttention kernel reads the full-block list at the partial list's
    offsets: both lists must be nb wide, one shape and one layout (narrower candidate lists
    gave an illegal address on the H200, and wrong rows with key padding)."""
    from sa_compile.sparse_op import build_block_mask

    nb, block = 9, 16
    gen = torch.Generator().manual_seed(width)
    cand = candidate_blocks(torch.rand(1, 2, nb, nb, generator=gen), width)
    order, count = select_candidate_lists(torch.rand(1, 2, nb, width, generator=gen), cand, nb, 0.4)
    valid = torch.ones(1, nb * block, dtype=torch.int64)
    if padded:
        valid[0, 20:40] = 0
    mask, _ = build_block_mask(order, count, block, nb * block, valid if padded else None)
    assert mask.kv_indices.shape == mask.full_kv_indices.shape == (1, 2, nb, nb)
    assert mask.kv_indices.stride() == mask.full_kv_indices.stride()
    assert mask.kv_num_blocks.shape == mask.full_kv_num_blocks.shape == (1, 2, nb)
    slots = torch.arange(nb)
    listed = torch.zeros(1, 2, nb, nb + 1, dtype=torch.bool)
    for num, idx in ((mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)):
        listed |= torch.zeros_like(listed).scatter_(-1, torch.where(slots < num[..., None], idx.long(), nb), True)
    assert torch.equal(listed[..., :nb], keep_mask(order, count))
