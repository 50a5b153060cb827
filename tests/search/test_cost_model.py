"""The sympy cost model against the selection's exact block counts."""

import doctest

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sa_compile.cost_model as cost_model
from sa_compile import PatternKind, SparseConfig
from sa_compile.cost_model import attention_cost, density_for_flop_budget
from sa_compile.patterns import realized_density
from sa_compile.selection import causal_block_count, select_blocks


@given(seq_len=st.integers(1, 5000), density=st.floats(0.01, 1.0), block=st.sampled_from([16, 64, 128]),
       taper_from=st.sampled_from([None, 512, 2048]))
def test_kernel_fraction_is_the_realized_density(seq_len, density, block, taper_from):
    cfg = SparseConfig(density=density, block_size=block, min_seq_len=0, last_q=16, taper_from=taper_from)
    cost = attention_cost(seq_len, cfg, heads=4, head_dim=32)
    assert cost["kernel_fraction"] == pytest.approx(realized_density(seq_len, cfg), rel=1e-12)


@pytest.mark.parametrize("seq_len", [32768, 65536, 131072])
def test_kernel_fraction_follows_the_default_taper(seq_len):
    cfg = SparseConfig()
    fraction = attention_cost(seq_len, cfg, heads=32, head_dim=128)["kernel_fraction"]
    assert fraction == pytest.approx(realized_density(seq_len, cfg), rel=1e-12)
    assert fraction < cfg.density * 32768 / seq_len * 1.01


def test_kernel_flops_count_the_blocks_the_selection_keeps():
    nb, block, heads, head_dim = 23, 16, 3, 32
    cfg = SparseConfig(density=0.3, block_size=block, min_seq_len=0)
    keep = select_blocks(torch.rand(1, heads, nb, nb, generator=torch.Generator().manual_seed(0)), cfg.density)
    cost = attention_cost(nb * block, cfg, heads=heads, head_dim=head_dim)
    assert cost["kernel_flops"] == 4 * block**2 * head_dim * int(keep.sum())
    assert cost["dense_flops"] == 4 * block**2 * head_dim * heads * causal_block_count(nb)


def test_search_flops():
    cfg = SparseConfig(block_size=128, last_q=64, pattern=PatternKind.AUTO)
    cost = attention_cost(32768, cfg, heads=32, head_dim=128)
    last_q, row_aware, pooled = 2 * 64 * 32768, 2 * 256 * 512, 2 * 256**2  # per head and head-dim unit
    assert cost["search_flops"] == (last_q + row_aware + pooled) * 128 * 32


@pytest.mark.parametrize("pattern,per_head", [
    (PatternKind.AUTO, 2 * 64 * 32768 + 2 * 256 * 512 + 2 * 256**2),
    (PatternKind.VERTICAL_SLASH, 2 * 64 * 32768 + 2 * 256 * 512),
    (PatternKind.BLOCK_SPARSE, 2 * 256**2),
    (PatternKind.BLOCK_QUERY, 2 * 256 * 32768),
    (PatternKind.STRIDED_QUERY, 256 * (128 // 8) * 32768),  # 16 sampled queries a block, ~N/2 keys each, 2 FLOPs
    (PatternKind.LOCAL, 0),
])
def test_search_flops_follow_the_pattern(pattern, per_head):
    cfg = SparseConfig(block_size=128, last_q=64, pattern=pattern, candidates=None)  # every block scored
    assert attention_cost(32768, cfg, heads=32, head_dim=128)["search_flops"] == per_head * 128 * 32


def test_a_flop_budget_pays_for_the_search_first():
    cfg = SparseConfig(min_seq_len=0)
    search = attention_cost(16384, cfg, 32, 128)["search_fraction"]
    assert density_for_flop_budget(0.1, 16384, cfg, 32, 128) == pytest.approx(0.1 - search)
    assert density_for_flop_budget(5.0, 16384, cfg, 32, 128) == 1.0
    with pytest.raises(ValueError, match="flop_budget=0.001"):
        density_for_flop_budget(0.001, 16384, cfg, 32, 128)


def test_module_example():
    result = doctest.testmod(cost_model)
    assert result.attempted >= 2 and result.failed == 0


def test_screened_search_share_falls_with_length_and_matches_the_full_search_below_its_width():
    """Past the candidates' width the screened search scores a constant number of blocks per
    row, so its share of dense FLOPs about halves as the prompt doubles; at 3 candidates per kept
    block its share at 256K is at most half of its share at 32K, and at most 0.03 at 128K."""
    cfg = SparseConfig(candidates=3)
    share = {n: attention_cost(n, cfg, heads=32, head_dim=128)["search_fraction"] for n in (32768, 131072, 262144)}
    assert share[262144] <= share[32768] / 2 and share[131072] <= 0.03
    assert share[262144] == pytest.approx(share[131072] / 2, rel=0.06)  # about: rows below the width score fewer
    # A width covering every causal block: the strided search's logits plus the screen's.
    wide = SparseConfig(candidates=64.0)
    unscreened = attention_cost(4096, SparseConfig(candidates=None), heads=4, head_dim=64)["search_flops"]
    screen = 3 * 2 * (4096 // 128) ** 2 * 64 * 4
    # The screened count is per kept tile (a diagonal tile counted whole): nb + 1 tiles for nb.
    assert attention_cost(4096, wide, heads=4, head_dim=64)["search_flops"] == pytest.approx(
        unscreened * (32 + 1) / 32 + screen)
