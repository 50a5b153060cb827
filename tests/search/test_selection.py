"""Budgeted block selection: causal, sink and diagonal kept, within budget, no empty rows."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile import SparseConfig
from sa_compile.patterns import realized_density
from sa_compile.selection import (
    blocks_per_row, causal_block_count, diagonal_only, grid_cost, keep_mask, select_block_lists,
    head_blocks_per_row, rank_blocks, select_blocks, tapered_density,
)

from ..strategies import core


@given(nb=st.integers(1, 300), density=st.floats(0.001, 1.0))
def test_blocks_per_row_is_the_largest_count_within_budget(nb, density):
    k = int(blocks_per_row(nb, density, "cpu"))
    budget = density * causal_block_count(nb)
    floor = min(2, nb)
    assert floor <= k <= nb
    if k > floor:
        assert grid_cost(k, nb) <= budget + 1e-6
    if k < nb:
        assert grid_cost(k + 1, nb) > budget - 1e-6


def test_full_density_keeps_every_causal_block():
    for nb in (1, 2, 7, 64):
        assert int(blocks_per_row(nb, 1.0, "cpu")) == nb
    scores = torch.rand(1, 2, 9, 9)
    scores[..., 3] = 0.0  # steps of no estimated mass: a full budget still takes them
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    for search_head_budgets in (False, True):
        keep = select_blocks(scores, 1.0, search_head_budgets)
        assert torch.equal(keep, causal.expand_as(keep))


@core
@given(seed=st.integers(0, 2**16), nb=st.integers(1, 40), density=st.floats(0.01, 1.0))
def test_selection_is_causal_keeps_sink_and_diagonal_and_meets_budget(seed, nb, density):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, nb, nb, generator=gen)
    keep = select_blocks(scores, density)
    rows = torch.arange(nb)
    assert not keep[..., rows[:, None] < rows[None, :]].any(), "a block above the diagonal was kept"
    assert keep[..., rows, rows].all(), "a diagonal block was dropped"
    assert keep[..., :, 0].all(), "the sink block was dropped"
    k = int(blocks_per_row(nb, density, "cpu"))
    expected_per_row = torch.minimum(torch.tensor(k), rows + 1)
    assert torch.equal(keep.sum(-1), expected_per_row.expand(2, 3, nb))
    kept = int(keep[0, 0].sum())
    assert kept <= max(density * causal_block_count(nb), grid_cost(min(2, nb), nb)) + 1e-6
    assert abs(kept / causal_block_count(nb) - realized_density(nb * 16, SparseConfig(
        density=density, block_size=16, min_seq_len=0))) < 1e-12


@core
@given(seed=st.integers(0, 2**16), nb=st.integers(2, 40))
def test_selection_keeps_the_highest_scoring_blocks(seed, nb):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, 1, nb, nb, generator=gen)
    keep = select_blocks(scores, 0.3)[0, 0]
    for row in range(2, nb):
        free = keep[row, 1:row]  # blocks neither sink nor diagonal
        if free.any() and not free.all():
            chosen = scores[0, 0, row, 1:row][free].min()
            dropped = scores[0, 0, row, 1:row][~free].max()
            assert chosen >= dropped


@core
@given(nb=st.integers(1, 40), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_block_lists_rank_diagonal_then_sink_and_match_the_grid(nb, density, seed):
    scores = torch.rand(2, 3, nb, nb, generator=torch.Generator().manual_seed(seed))
    order, count = select_block_lists(scores, density)
    rows = torch.arange(nb)
    assert torch.equal(order[..., 0], rows.expand(2, 3, nb)), "the diagonal must rank first (it is the partial block)"
    if nb > 1:
        assert torch.equal(order[..., 1:, 1], torch.zeros(2, 3, nb - 1, dtype=order.dtype)), "then the sink"
    assert bool((count >= 1).all()) and bool((count <= rows + 1).all())
    keep = keep_mask(order, count)
    assert torch.equal(keep.sum(-1), count)
    listed = torch.zeros_like(keep)
    for b, h, qb in torch.cartesian_prod(torch.arange(2), torch.arange(3), rows).tolist():
        listed[b, h, qb, order[b, h, qb, : count[b, h, qb]]] = True
    assert torch.equal(listed, keep)
    assert torch.equal(keep, select_blocks(scores, density))


def test_diagonal_only():
    counts, indices = diagonal_only(1, 2, 5, "cpu")
    assert counts.tolist() == [[[1] * 5] * 2]
    assert indices[0, 1, :, 0].tolist() == [0, 1, 2, 3, 4]


@given(n=st.integers(1, 8192), block=st.sampled_from([16, 32, 64]), taper=st.sampled_from([None, 256, 1024]),
       density=st.floats(0.01, 1.0))
def test_in_graph_budget_matches_realized_density(n, block, taper, density):
    """The count the graph computes (tensor math, symbolic nb) is the one the records report."""
    cfg = SparseConfig(density=density, block_size=block, min_seq_len=0, taper_from=taper)
    nb = -(-n // block)
    taper_blocks = None if taper is None else taper / block
    k = int(blocks_per_row(nb, tapered_density(density, taper_blocks, nb, "cpu"), "cpu"))
    assert grid_cost(k, nb) / causal_block_count(nb) == realized_density(n, cfg)


def test_taper_keeps_the_blocks_per_row_past_taper_from():
    cfg = SparseConfig(density=0.1, block_size=16, min_seq_len=0, taper_from=1024)
    k_at = [int(blocks_per_row(nb, cfg.density_at(nb), "cpu")) for nb in (64, 128, 256, 512)]
    assert max(k_at) - min(k_at) <= 1, k_at
    assert realized_density(8192, cfg) < realized_density(4096, cfg) < realized_density(1024, cfg)


def test_realized_density_is_dense_below_min_seq_len():
    cfg = SparseConfig(density=0.1, min_seq_len=4096)
    assert realized_density(4095, cfg) == 1.0
    assert realized_density(65536, cfg) < 0.11


@given(seed=st.integers(0, 2**16), nb=st.integers(64, 128), density=st.floats(0.05, 0.3))
def test_searched_head_budgets_spend_the_layer_budget(seed, nb, density):
    """The layer total stays within what the uniform split computes and lands within 5% of it
    (32 heads): the search moves blocks between heads, it adds none."""
    gen = torch.Generator().manual_seed(seed)
    heads = 32
    sharpness = 1 + 10 * torch.rand(1, heads, 1, 1, generator=gen)
    scores = torch.rand(1, heads, nb, nb, generator=gen) ** sharpness
    keep = select_blocks(scores, density, search_head_budgets=True)
    budget = int(select_blocks(scores, density).sum())
    assert budget <= max(density * heads * causal_block_count(nb), heads * grid_cost(2, nb))
    cost = int(keep.sum())
    assert 0.95 * budget <= cost <= budget
    rows = torch.arange(nb)
    assert keep[..., rows, rows].all() and keep[..., :, 0].all()
    assert not keep[..., rows[:, None] < rows[None, :]].any()


def cheapest_fitting_allocation(sorted_BHQK, budget):
    """Every distinct price tried one at a time: the smallest whose allocation fits."""
    _, H, nb, _ = sorted_BHQK.shape
    per_block = []
    for h in range(H):
        steps = [float("inf"), float("inf")]
        for k in range(2, nb):
            row_gains = [float(sorted_BHQK[0, h, qb, k]) for qb in range(k, nb)]
            steps.append(min(steps[-1], sum(row_gains) / (nb - k)))
        per_block.append(steps)

    def allocation(price):
        return [min(nb, max(2, sum(step >= price for step in steps))) for steps in per_block]

    prices = sorted({0.0, *(step for steps in per_block for step in steps if step != float("inf"))})
    for price in prices:
        taken = allocation(price)
        if sum(int(grid_cost(k, nb)) for k in taken) <= budget:
            return taken
    return allocation(float("inf"))


@given(seed=st.integers(0, 2**16), heads=st.integers(1, 6), nb=st.integers(1, 24), density=st.floats(0.05, 1.0))
def test_head_budget_price_search_matches_trying_every_price(seed, heads, nb, density):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, nb, nb, generator=gen) ** (1 + 8 * torch.rand(1, heads, 1, 1, generator=gen))
    scores = torch.where(torch.ones(nb, nb, dtype=torch.bool).tril(), scores, float("-inf"))
    _, sorted_BHQK = rank_blocks(scores)
    budget = heads * int(grid_cost(blocks_per_row(nb, density, "cpu"), nb))
    assert head_blocks_per_row(sorted_BHQK, density)[0].tolist() == cheapest_fitting_allocation(sorted_BHQK, budget)


def test_searched_head_budgets_go_where_the_mass_is_spread():
    """A local head needs only its diagonal; a diffuse head gets the blocks it frees."""
    nb = 64
    rows = torch.arange(nb)
    local = torch.eye(nb)
    column = torch.zeros(nb, nb)
    column[:, 0] = 1.0
    column[rows, rows] = 0.1
    diffuse = torch.ones(nb, nb).tril()
    scores = torch.stack([local, column, diffuse])[None]
    scores = scores / scores.sum(-1, keepdim=True)
    searched = select_blocks(scores, 0.2, search_head_budgets=True)
    uniform = select_blocks(scores, 0.2)
    per_head = searched.sum((-1, -2))[0]
    assert per_head[0] == per_head[1] == grid_cost(2, nb), "local and column heads need only the floor"
    assert per_head[2] > uniform.sum((-1, -2))[0, 2]
    assert searched.sum() <= uniform.sum()
    assert (scores * searched).sum() > (scores * uniform).sum()
