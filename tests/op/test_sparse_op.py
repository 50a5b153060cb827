"""The compiled sparse op against dense references: full budget, same-mask, needles."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sa_compile import PatternKind, SparseConfig, sparse_attention
from sa_compile.patterns import realized_density
from sa_compile.selection import causal_block_count, keep_mask, select_block_lists
from sa_compile.sparse_op import build_block_mask, select_kept_blocks, stable_partition

from sa_compile.reference import dense_reference, masked_reference, token_mask

from ..helpers import BLOCK, DEVICES, assert_close, attention_inputs

_compiled = {}


def compiled_op(dynamic: bool):
    """One compiled op per dynamism, reused across tests and hypothesis examples."""
    if dynamic not in _compiled:
        _compiled[dynamic] = torch.compile(sparse_attention, fullgraph=True, dynamic=dynamic)
    return _compiled[dynamic]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Override the reset of conftest: the compiled ops here are shared on purpose."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_density_reproduces_dense_attention(dtype, device):
    block = BLOCK[device]
    q, k, v = attention_inputs(0, 2, 4, 2, block * 4 + 13, 32, dtype, device)
    cfg = SparseConfig(density=1.0, block_size=block, min_seq_len=0)
    out = compiled_op(False)(q, k, v, cfg)
    assert out.dtype == dtype
    assert_close(out, dense_reference(q, k, v), dtype)
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        **{torch.float32: dict(atol=1e-5, rtol=1e-5)}.get(dtype, dict(atol=2e-2, rtol=2e-2)),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(
    seed=st.integers(0, 2**16),
    blocks=st.floats(1.1, 10.0),
    density=st.sampled_from([0.15, 0.4, 0.7]),
    pattern=st.sampled_from(list(PatternKind)),
    search=st.booleans(),
)
def test_sparse_output_equals_dense_attention_under_the_same_block_mask(
    device, seed, blocks, density, pattern, search
):
    block = BLOCK[device]
    seq_len = int(blocks * block)
    q, k, v = attention_inputs(seed, 1, 4, 2, seq_len, 16, torch.float32, device)
    cfg = SparseConfig(density=density, block_size=block, min_seq_len=0, last_q=8, pattern=pattern,
                       search_head_budgets=search)
    out, keep = compiled_op(True)(q, k, v, cfg, return_keep=True)
    assert torch.equal(keep, select_kept_blocks(q, k, cfg, 16**-0.5)), "compiled and eager searches disagree"
    reference = masked_reference(q, k, v, token_mask(keep, block, seq_len))
    assert_close(out, reference)
    if not torch.equal(keep, torch.ones_like(keep).tril()):
        assert (out.double() - dense_reference(q, k, v)).abs().max() > 1e-4, "sparsity had no effect"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_budget_follows_the_taper(device):
    block = BLOCK[device]
    seq_len, nb = block * 12 + 5, 13
    cfg = SparseConfig(density=0.5, block_size=block, min_seq_len=0, taper_from=block * 4)
    q, k, v = attention_inputs(1, 1, 4, 2, seq_len, 16, torch.float32, device)
    _, keep = compiled_op(True)(q, k, v, cfg, return_keep=True)
    computed = keep.sum().item() / (4 * causal_block_count(nb))
    assert computed == pytest.approx(realized_density(seq_len, cfg), abs=1e-12)
    assert realized_density(seq_len, cfg) < realized_density(seq_len, replace(cfg, taper_from=None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["left", "right", "holes"])
def test_key_padding_is_masked_exactly(padding, device):
    block = BLOCK[device]
    seq_len = block * 5 + 10
    q, k, v = attention_inputs(1, 2, 4, 2, seq_len, 16, torch.float32, device)
    valid = torch.ones(2, seq_len, dtype=torch.int64)
    if padding == "left":
        valid[0, :21] = 0
    elif padding == "right":
        valid[1, -40:] = 0
    else:
        valid[:, 5 : seq_len * 2 // 3 : 3] = 0
    valid = valid.to(device)
    # The last config is screened: 3 candidates per row of 6 blocks.
    screened = SparseConfig(density=0.4, block_size=block, min_seq_len=0, taper_from=2 * block, candidates=1.5)
    assert screened.candidate_width() == 3
    for cfg in (SparseConfig(density=1.0, block_size=block, min_seq_len=0, last_q=8),
                SparseConfig(density=0.4, block_size=block, min_seq_len=0, last_q=8), screened):
        out, keep = compiled_op(device == "cuda")(q, k, v, cfg, kv_valid_BN=valid, return_keep=True)
        assert_close(out, masked_reference(q, k, v, token_mask(keep, block, seq_len, valid)))
        if cfg.density == 1.0:
            assert_close(out, dense_reference(q, k, v, kv_valid_BN=valid))


@given(seed=st.integers(0, 2**16), width=st.integers(1, 40), groups=st.integers(1, 3))
def test_stable_partition_is_a_stable_sort_by_group(seed, width, groups):
    """The padded block lists' partition (running counts and a scatter) against the stable sort it replaced."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 50, (2, 3, 4, width), generator=gen)
    group = torch.randint(0, groups, (2, 3, 4, width), generator=gen)
    expected = values.gather(-1, torch.sort(group, dim=-1, stable=True).indices)
    assert torch.equal(stable_partition(values, group, groups), expected)
    assert torch.equal(torch.compile(stable_partition, fullgraph=True)(values, group, groups), expected)


@given(seed=st.integers(0, 2**16), density=st.floats(0.05, 1.0), tail=st.integers(0, 15), padded=st.booleans())
def test_padded_block_lists_keep_the_same_blocks_and_end_with_the_diagonal(seed, density, tail, padded):
    """With key padding the kept blocks split in two lists: full blocks (every key valid, below
    the diagonal) and partial ones. The CUDA kernel cuts a row's partial list after
    ceil(N / tile) tiles, so the last row's diagonal, the one block reaching past N, must
    end it, or a real block is silently dropped. An all-ones mask leaves only the diagonal
    partial, as without padding."""
    nb, block = 7, 16
    seq_len = nb * block - tail
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, nb, nb, generator=gen)
    valid = torch.ones(2, seq_len, dtype=torch.int64)
    if padded:
        valid[0, 20:40] = 0  # blocks 1 and 2 of the first batch entry hold padding
    order, count = select_block_lists(scores, density)
    mask, _ = build_block_mask(order, count, block, seq_len, valid)
    num, idx = mask.kv_num_blocks.long(), mask.kv_indices.long()
    full_num, full_idx = mask.full_kv_num_blocks.long(), mask.full_kv_indices.long()
    assert torch.equal(num + full_num, count)
    assert torch.equal(idx.gather(-1, num[..., None] - 1)[..., 0], torch.arange(nb).expand_as(num))
    slots = torch.arange(nb)
    partial = torch.zeros(2, 3, nb, nb, dtype=torch.bool).scatter_(-1, idx, slots < num[..., None])
    full = torch.zeros(2, 3, nb, nb, dtype=torch.bool).scatter_(-1, full_idx, slots < full_num[..., None])
    assert not (partial & full).any()
    assert torch.equal(partial | full, keep_mask(order, count))
    whole_BK = torch.nn.functional.pad(valid != 0, (0, tail)).view(2, nb, block).all(-1)
    diagonal = torch.eye(nb, dtype=torch.bool)
    assert torch.equal(full, keep_mask(order, count) & whole_BK[:, None, None, :] & ~diagonal)
    if not padded and tail == 0:
        assert torch.equal(partial, diagonal.expand_as(partial))



@given(seed=st.integers(0, 2**16), depth=st.floats(0.05, 0.8))
def test_a_planted_needle_is_always_selected(seed, depth):
    """Keys that the last queries match strongly are kept for the queries that follow."""
    seq_len, block = 512, 32
    q, k, _ = attention_inputs(seed, 1, 2, 1, seq_len, 32, torch.float32)
    q, k = q * 0.2, k * 0.2
    pos = int(depth * seq_len)
    k[:, :, pos : pos + 4] = q[:, :, -16:].mean((1, 2), keepdim=True) * 30
    for pattern in (PatternKind.AUTO, PatternKind.VERTICAL_SLASH):
        # 16 blocks at density 0.4 leave one free block per row besides sink and diagonal.
        cfg = SparseConfig(density=0.4, block_size=block, min_seq_len=0, last_q=16, pattern=pattern)
        keep = select_kept_blocks(q, k, cfg, 32**-0.5)
        assert int(keep[0, 0, -1].sum()) == 3
        needle_block = pos // block
        assert keep[0, :, needle_block + 1 :, needle_block].all(), f"needle at {pos} dropped ({pattern})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_block_query_pattern_through_the_compiled_op(device, density):
    block = BLOCK[device]
    seq_len = block * 6 + 3
    q, k, v = attention_inputs(7, 1, 4, 2, seq_len, 16, torch.float32, device)
    cfg = SparseConfig(density=density, block_size=block, min_seq_len=0, pattern=PatternKind.BLOCK_QUERY)
    out, keep = compiled_op(True)(q, k, v, cfg, return_keep=True)
    assert torch.equal(keep, select_kept_blocks(q, k, cfg, 16**-0.5)), "compiled and eager searches disagree"
    reference = dense_reference(q, k, v) if density == 1.0 else masked_reference(q, k, v, token_mask(keep, block, seq_len))
    assert_close(out, reference)
