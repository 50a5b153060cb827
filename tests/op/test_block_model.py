"""The block model (sa_compile.reference): the oracle's blocks, the search's, its attention, its model hook."""

import pytest
import torch
from torch._dynamo.utils import counters
from hypothesis import given
from hypothesis import strategies as st

import sa_compile
from sa_compile import SparseConfig
from sa_compile.hf_cache import cache_argument, output_cache
from sa_compile.reference import (
    block_attention, dense_reference, masked_reference, oracle_block_attention, search_block_attention, search_counts,
    token_mask,
)
from sa_compile.sparse_op import select_kept_blocks

from ..helpers import assert_close, attention_inputs, tiny_llama
from ..search.test_recall import naive_block_mass


def naive_oracle_keep(mass_BHQK, counts_Q):
    """Per row, the ``counts_Q[qb]`` causal blocks of most mass, one Python loop per row."""
    keep = torch.zeros_like(mass_BHQK, dtype=torch.bool)
    B, H, nb, _ = mass_BHQK.shape
    for b in range(B):
        for h in range(H):
            for qb in range(nb):
                top = torch.argsort(mass_BHQK[b, h, qb, : qb + 1], descending=True, stable=True)[: counts_Q[qb]]
                keep[b, h, qb, top] = True
    return keep


@given(seed=st.integers(0, 2**16), seq_len=st.sampled_from([64, 100, 128]), density=st.sampled_from([0.2, 0.5]))
def test_oracle_attention_equals_attention_under_the_naive_oracle_mask(seed, seq_len, density):
    q, k, v = attention_inputs(seed, 1, 4, 2, seq_len, 16, torch.float32)
    config = SparseConfig(density=density, block_size=16, min_seq_len=0)
    keep = naive_oracle_keep(naive_block_mass(q, k, 16), search_counts(config, seq_len, "cpu"))
    expected = masked_reference(q, k, v, token_mask(keep, 16, seq_len))
    assert_close(oracle_block_attention(q, k, v, config, 16**-0.5), expected)


def test_full_budget_is_dense_attention():
    q, k, v = attention_inputs(3, 2, 4, 2, 100, 16, torch.float32)
    config = SparseConfig(density=1.0, block_size=16, min_seq_len=0)
    assert_close(oracle_block_attention(q, k, v, config, 16**-0.5), dense_reference(q, k, v))


@pytest.mark.parametrize("seq_len,density", [(256, 0.1), (256, 0.3), (440, 0.2)])
def test_counts_are_the_searchs_own(seq_len, density):
    q, k, _ = attention_inputs(1, 1, 4, 2, seq_len, 16, torch.float32)
    config = SparseConfig(density=density, block_size=16, min_seq_len=0)
    kept_per_row = select_kept_blocks(q, k, config, 16**-0.5).sum(-1)
    assert torch.equal(kept_per_row, search_counts(config, seq_len, "cpu").expand_as(kept_per_row))


def test_model_hook_runs_the_oracle_and_restores_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dense = model(ids).logits
        with block_attention(model, SparseConfig(density=1.0, block_size=16, min_seq_len=0), "oracle"):
            full = model(ids).logits
        with block_attention(model, SparseConfig(density=0.2, block_size=16, min_seq_len=0), "oracle"):
            sparse = model(ids).logits
        after = model(ids).logits
    assert_close(full, dense)
    assert (sparse - dense).abs().max() > 1e-3  # a budget below the whole grid changes the answer
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(after, dense)


def test_head_budget_configs_get_the_uniform_counts_and_tables_are_refused(tmp_path):
    uniform = search_counts(SparseConfig(), 65536, "cpu")
    assert torch.equal(search_counts(SparseConfig(search_head_budgets=True), 65536, "cpu"), uniform)
    with pytest.raises(ValueError, match="one budget"):
        search_counts(SparseConfig(patterns=str(tmp_path / "table.json")), 4096, "cpu")


@given(seed=st.integers(0, 2**16), seq_len=st.sampled_from([64, 100, 128]), density=st.sampled_from([0.2, 0.5]))
def test_search_attention_equals_attention_under_the_searchs_mask(seed, seq_len, density):
    q, k, v = attention_inputs(seed, 1, 4, 2, seq_len, 16, torch.float32)
    config = SparseConfig(density=density, block_size=16, min_seq_len=0)
    expected = masked_reference(q, k, v, token_mask(select_kept_blocks(q, k, config, 16**-0.5), 16, seq_len))
    assert_close(search_block_attention(q, k, v, config, 16**-0.5), expected)


def test_search_blocks_give_the_compiled_backends_logits():
    """The eager search model is the backend without the compile: same blocks, same answer."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(1))
    config = SparseConfig(density=0.3, block_size=16, min_seq_len=0)
    compiled = torch.compile(model, backend=sa_compile.make_backend(config))
    with torch.inference_mode():
        dense = model(ids).logits
        backend = compiled(ids).logits
        with block_attention(model, config, "search"):
            eager = model(ids).logits
    assert counters["sa_compile"]["rewritten"] == 2
    assert (backend - dense).abs().max() > 1e-3  # the budget is below the grid: a real sparse answer
    assert_close(eager, backend)


def test_decode_steps_stay_dense_and_unknown_choosers_are_refused():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    config = SparseConfig(density=0.2, block_size=16, min_seq_len=0)
    with torch.inference_mode():
        token = ids[:, -1:]
        cache = output_cache(model(ids, use_cache=True))
        dense = model(token, use_cache=True, **cache_argument(model, cache)).logits
        cache = output_cache(model(ids, use_cache=True))
        with block_attention(model, config, "search"):
            step = model(token, use_cache=True, **cache_argument(model, cache)).logits
    assert_close(step, dense)
    with pytest.raises(ValueError, match="expected one of"):
        with block_attention(model, config, "best"):
            pass
