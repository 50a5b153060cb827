"""The sympy cost model against what the code computes: the selection's block counts and the searches' FLOPs."""

import doctest

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import sa_compile.cost_model as cost_model
from sa_compile import SparseConfig
from sa_compile.cost_model import attention_cost, density_for_flop_budget
from sa_compile.estimates import kind_scores
from sa_compile.patterns import realized_density
from sa_compile.selection import causal_block_count, select_blocks
from sa_compile.templates.screened_query import candidate_blocks, screen_scores
from sa_compile.templates.strided_query import strided_block_mass_reference


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


# The search FLOPs of the cost model against what the templates compute: torch's FLOP counter
# around a kind's scores (matmuls, 2 FLOPs per multiply-add), or, where the work is a custom op,
# the query-key tiles the code decides to compute.
SHAPE = dict(B=1, H=4, G=2, N=1024, D=32)


def _qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = SHAPE
    return (torch.randn(s["B"], s["H"], s["N"], s["D"], generator=g),
            torch.randn(s["B"], s["G"], s["N"], s["D"], generator=g))


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["local", "vertical_slash", "block_sparse", "auto", "block_query"])
def test_search_flops_are_the_matmuls_the_template_runs(kind):
    cfg = SparseConfig(block_size=64, min_seq_len=0, last_q=16, pattern=kind)
    q, k = _qk()
    counted = _counted(lambda: kind_scores([kind], q, k, cfg, SHAPE["D"] ** -0.5))
    assert attention_cost(SHAPE["N"], cfg, heads=SHAPE["H"], head_dim=SHAPE["D"])["search_flops"] == counted


def test_strided_search_flops_are_the_causal_tiles_of_its_samples():
    """The reference, one query block per chunk, computes each block's samples against the keys
    up to its own block's end: the causal tiles, the diagonal one whole, which is the model's
    count times (nb + 1) / nb."""
    cfg = SparseConfig(block_size=64, min_seq_len=0, query_stride=8, candidates=None)
    q, k = _qk()
    nb = SHAPE["N"] // cfg.block_size
    # Chunks of one query block: the float32 logits of one block's samples against every key.
    one_block = SHAPE["B"] * SHAPE["H"] * (cfg.block_size // cfg.query_stride) * SHAPE["N"] * 4
    counted = _counted(lambda: strided_block_mass_reference(q, k, None, cfg.block_size, cfg.query_stride,
                                                            SHAPE["D"] ** -0.5, chunk_bytes=one_block))
    model = attention_cost(SHAPE["N"], cfg, heads=SHAPE["H"], head_dim=SHAPE["D"])["search_flops"]
    assert counted == pytest.approx(model * (nb + 1) / nb, rel=1e-12)


@pytest.mark.parametrize("candidates", [1.0, 3.0, 64.0])
def test_screened_search_flops_are_its_screen_and_its_live_candidate_tiles(candidates):
    """The screen's pooled matmuls, counted, plus each live candidate slot's sampled queries
    against its block's keys, the tiles the candidate kernel computes."""
    cfg = SparseConfig(block_size=64, min_seq_len=0, taper_from=256, density=0.3, candidates=candidates)
    q, k = _qk()
    scale, bs = SHAPE["D"] ** -0.5, cfg.block_size
    screen = []
    screen_flops = _counted(lambda: screen.append(screen_scores(q, k, bs, scale)))
    live_slots = int((candidate_blocks(screen[0], cfg.candidate_width()) >= 0).sum())  # over (B, G, rows)
    heads_per_group = SHAPE["H"] // SHAPE["G"]
    tiles = 2 * (bs // cfg.query_stride) * bs * SHAPE["D"] * heads_per_group * live_slots
    model = attention_cost(SHAPE["N"], cfg, heads=SHAPE["H"], head_dim=SHAPE["D"])["search_flops"]
    assert model == screen_flops + tiles


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
    row, so its share of dense FLOPs about halves as the prompt doubles; at the default (4
    candidates per kept block) and at 3 its share at 256K is at most half of its share at 32K,
    and at most 0.03 at 128K."""
    # The unscreened search's share stays where it is: a constant share of a quadratic.
    full = {n: attention_cost(n, SparseConfig(candidates=None), heads=32, head_dim=128)["search_fraction"]
            for n in (32768, 262144)}
    assert full[262144] == pytest.approx(full[32768], rel=0.01)
    for cfg in (SparseConfig(), SparseConfig(candidates=3)):
        share = {n: attention_cost(n, cfg, heads=32, head_dim=128)["search_fraction"] for n in (32768, 131072, 262144)}
        assert share[262144] <= share[32768] / 2 and share[131072] <= 0.03 and share[262144] < full[262144] / 5
        assert share[262144] == pytest.approx(share[131072] / 2, rel=0.06)  # about: rows below the width score fewer
