"""Selection invariants that no score can break: diagonal in slot 0, sink in slot 1, nothing
above the diagonal, whatever the scores hold (NaN, +-inf, ties, zeros, huge values)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile import PatternKind, SparseConfig
from sa_compile.selection import blocks_per_row, keep_mask, rank_blocks, select_block_lists, select_head_block_lists
from sa_compile.sparse_op import build_block_mask, select_kept_blocks

from ..strategies import core, score_grids


def assert_causal_lists(order_BHQW, count_BHQ, k=None):
    """The invariants build_block_mask relies on, row by row. The lists are ``nb`` wide (every
    block ranked: each row a permutation, causal blocks first) or, from a screened search, as
    wide as the candidates (each row's kept slots distinct causal blocks)."""
    B, H, nb, W = order_BHQW.shape
    rows = torch.arange(nb)
    assert torch.equal(order_BHQW[..., 0], rows.expand(B, H, nb)), "slot 0 is not the diagonal"
    if nb > 1 and W > 1:
        assert (order_BHQW[..., 1:, 1] == 0).all(), "slot 1 is not the sink"
    assert bool((count_BHQ >= 1).all()) and bool((count_BHQ <= rows + 1).all())
    if k is not None:
        assert torch.equal(count_BHQ, torch.minimum(k, rows + 1).expand_as(count_BHQ))
    slots = torch.arange(W)
    kept_BHQW = slots < count_BHQ[..., None]
    assert not (kept_BHQW & (order_BHQW > rows[:, None])).any(), "a kept block lies above the diagonal"
    if W == nb:
        assert torch.equal(order_BHQW.sort(-1).values, rows.expand_as(order_BHQW)), "a row is not a permutation"
        listed_causal = order_BHQW <= rows[:, None]
        assert torch.equal(listed_causal, (slots <= rows[:, None]).expand_as(listed_causal)), \
            "a block above the diagonal ranks among causal ones"
    keep = keep_mask(order_BHQW, count_BHQ)
    assert torch.equal(keep.sum(-1), count_BHQ), "a block is kept twice"
    assert not keep[..., rows[:, None] < rows[None, :]].any(), "a block above the diagonal was kept"


def assert_mask_is_causal(order_BHQW, count_BHQ, block=16):
    """BlockMask: each row's diagonal partial (causal mask_mod) and every full block strictly below it."""
    nb = order_BHQW.shape[-2]
    mask, _ = build_block_mask(order_BHQW, count_BHQ, block, nb * block)
    rows = torch.arange(nb)
    assert (mask.kv_num_blocks == 1).all() and torch.equal(mask.kv_indices[..., 0].long(), rows.expand_as(count_BHQ))
    full_num, full_idx = mask.full_kv_num_blocks.long(), mask.full_kv_indices.long()
    listed = torch.arange(full_idx.shape[-1]) < full_num[..., None]
    assert not (listed & (full_idx >= rows[:, None])).any(), "a diagonal or future block runs without the mask"


def test_a_nan_score_cannot_move_the_diagonal():
    """The issue's case: a descending sort puts NaN above +inf (the old diagonal's key)."""
    scores = torch.rand(1, 1, 6, 6)
    scores[0, 0, 3, 1] = float("nan")
    order, count = select_block_lists(scores, 1.0)
    assert order[0, 0, 3].tolist()[:2] == [3, 0]
    assert_causal_lists(order, count)
    assert_mask_is_causal(order, count)


@core
@given(scores=score_grids(), density=st.floats(0.01, 1.0), search=st.booleans())
def test_adversarial_scores_give_a_causal_selection(scores, density, search):
    order, count = select_block_lists(scores, density, search)
    k = None if search else blocks_per_row(scores.shape[-1], density, "cpu")
    assert_causal_lists(order, count, k)
    assert_mask_is_causal(order, count)


@core
@given(scores=score_grids(), seed=st.integers(0, 2**16))
def test_adversarial_scores_with_per_head_budgets_give_a_causal_selection(scores, seed):
    density_H = torch.rand(scores.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order, count = select_head_block_lists(scores, density_H.clamp(min=0.01))
    assert_causal_lists(order, count)
    assert_mask_is_causal(order, count)


@core
@given(scores=score_grids())
def test_ranking_keys_are_finite_between_the_forced_blocks(scores):
    """The head-budget search sums these keys: finite, and ordered like the list."""
    _, sorted_BHQK = rank_blocks(scores)
    nb = scores.shape[-1]
    slots, rows = torch.arange(nb), torch.arange(nb)[:, None]
    free = (slots >= 2) & (slots <= rows)
    assert torch.isfinite(sorted_BHQK[..., free]).all()
    assert (sorted_BHQK[..., 0] == float("inf")).all()
    assert (sorted_BHQK[..., slots > rows] == float("-inf")).all()
    assert (sorted_BHQK[..., :-1] >= sorted_BHQK[..., 1:]).all(), "keys out of order"


@given(seed=st.integers(0, 2**16))
def test_valid_scores_rank_as_a_plain_descending_sort(seed):
    """Finite scores without ties: the free blocks come in descending score order (no change
    from the sort-rank construction this replaced)."""
    nb = 9
    scores = torch.rand(2, 2, nb, nb, generator=torch.Generator().manual_seed(seed))
    order, _ = rank_blocks(scores)
    for qb in range(2, nb):
        free = order[..., qb, 2 : qb + 1]
        expected = scores[..., qb, 1:qb].argsort(-1, descending=True) + 1
        assert torch.equal(free, expected)


def test_fp16_logits_that_overflow_still_select_causally_and_finitely():
    """q.k of 300 * 300 * 64 overflows float16's 65504: the estimates are computed in float32."""
    gen = torch.Generator().manual_seed(0)
    N, D = 200, 64
    q = (torch.randn(1, 2, N, D, generator=gen) * 300).half()
    k = (torch.randn(1, 1, N, D, generator=gen) * 300).half()
    assert not torch.isfinite(q[..., -16:, :] @ k.transpose(-1, -2)).all(), "the input no longer overflows"
    from sa_compile.sparse_op import estimate_block_scores

    for pattern in PatternKind:
        cfg = SparseConfig(density=0.3, block_size=16, min_seq_len=0, last_q=16, pattern=pattern)
        scores = estimate_block_scores(q, k, cfg, D**-0.5)
        assert torch.isfinite(scores).all(), pattern
        keep = select_kept_blocks(q, k, cfg, D**-0.5)
        rows = torch.arange(keep.shape[-1])
        assert keep[..., rows, rows].all() and not keep[..., rows[:, None] < rows[None, :]].any()
