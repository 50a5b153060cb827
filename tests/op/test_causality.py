"""Causality under adversarial inputs: nothing after position t reaches an output up to t.

The search reads every key (the last queries see the whole prompt), so changing future
keys may change which past blocks a row keeps; that is the pattern's choice, not a leak.
What must never happen is a past output reading a future (or padded) key's value, and for
a fixed choice of blocks, a past output depending on anything in the future.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sa_compile
from sa_compile import PatternKind, SparseConfig, sparse_attention

from sa_compile.sparse_op import estimate_block_scores, search_blocks

from sa_compile.reference import masked_reference, token_mask

from ..helpers import TOLERANCES, attention_inputs, tiny_llama
from ..strategies import attention_shapes, core, key_padding
from ..search.test_invariants import assert_causal_lists, assert_mask_is_causal

BLOCK = 16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEARCHED = SparseConfig(density=0.3, block_size=BLOCK, min_seq_len=0, last_q=8)  # AUTO: both estimates


_ops = {}


def _compiled(dynamic: bool):
    """One compiled op per dynamism, shared by the examples of a test (a new wrapper per
    example would recompile every time)."""
    if dynamic not in _ops:
        _ops[dynamic] = torch.compile(sparse_attention, fullgraph=True, dynamic=dynamic)
    return _ops[dynamic]


def _inputs(shape: dict, seed: int, dtype, norm: float):
    q, k, v = attention_inputs(seed, shape["batch"], shape["heads"], shape["kv_heads"], shape["seq_len"],
                               shape["head_dim"], torch.float32)
    return (q * norm).to(dtype), (k * norm).to(dtype), v.to(dtype)


def _future_changed(x, t, seed, magnitude):
    """``x`` with every position after ``t`` replaced by large values of another draw."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)) * magnitude
    changed = x.clone()
    changed[..., t + 1 :, :] = noise[..., t + 1 :, :].to(x.dtype)
    return changed


def _assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Override conftest's reset: the compiled op and model are shared by the examples."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@core
@given(shape=attention_shapes(), dtype=st.sampled_from(DTYPES), norm=st.sampled_from([1.0, 30.0, 300.0, 3e4]),
       scale=st.sampled_from([None, 0.01, 1.0]), padding=st.sampled_from(["none", "left", "right", "holes"]),
       pattern=st.sampled_from(list(PatternKind)), density=st.sampled_from([0.1, 0.3, 1.0]),
       search=st.booleans(), seed=st.integers(0, 2**16))
def test_the_search_on_adversarial_inputs_builds_a_causal_block_mask(shape, dtype, norm, scale, padding, pattern,
                                                                     density, search, seed):
    """The eager search (what the compiled graph computes), on every pattern: finite
    estimates, the diagonal partial in every row, nothing above it kept."""
    q, k, _ = _inputs(shape, seed, dtype, norm)
    valid_BN = key_padding(padding, shape["batch"], shape["seq_len"], seed)
    config = SparseConfig(density=density, block_size=BLOCK, min_seq_len=0, last_q=8, pattern=pattern,
                          search_head_budgets=search)
    scale = shape["head_dim"] ** -0.5 if scale is None else scale
    scores = estimate_block_scores(q, k, config, scale, valid_BN)
    if norm < 3e4:  # float16 inputs past that norm are inf themselves
        assert torch.isfinite(scores).all()
    order, count = search_blocks(q, k, config, scale, valid_BN)
    assert_causal_lists(order, count)
    assert_mask_is_causal(order, count, BLOCK)


@given(dtype=st.sampled_from(DTYPES), norm=st.sampled_from([1.0, 300.0]),
       padding=st.sampled_from(["none", "left", "holes"]), t_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_future_and_padded_keys_and_values_never_reach_past_outputs(dtype, norm, padding, t_frac, seed):
    """The compiled op, at one odd length (static shapes: Inductor's CPU template reads a
    padding buffer only there; the lengths and shapes are drawn in the eager test above)."""
    op = _compiled(dynamic=False)
    shape = dict(batch=2, heads=4, kv_heads=2, seq_len=5 * BLOCK + 3, head_dim=16)
    q, k, v = _inputs(shape, seed, dtype, norm)
    valid_BN = key_padding(padding, 2, shape["seq_len"], seed)
    t = int(t_frac * (shape["seq_len"] - 1))
    out, keep = op(q, k, v, SEARCHED, kv_valid_BN=valid_BN, return_keep=True)
    # Values do not feed the search: the same blocks, so past rows must be bitwise the same,
    # whatever the future and the padded positions hold.
    v2 = _future_changed(v, t, seed, 1e3)
    if valid_BN is not None:
        v2 = torch.where((valid_BN == 0)[:, None, :, None], torch.full_like(v, 1e3), v2)
    out_v, keep_v = op(q, k, v2, SEARCHED, kv_valid_BN=valid_BN, return_keep=True)
    assert torch.equal(keep_v, keep)
    _assert_same(out_v[..., : t + 1, :], out[..., : t + 1, :])
    # Keys do: the blocks may change, but past rows read only past keys of the blocks kept.
    k2, v2 = _future_changed(k, t, seed + 7, norm), _future_changed(v, t, seed + 9, 1e3)
    out_kv, keep_kv = op(q, k2, v2, SEARCHED, kv_valid_BN=valid_BN, return_keep=True)
    rows = torch.arange(keep_kv.shape[-1])
    assert not keep_kv[..., rows[:, None] < rows[None, :]].any(), "a block above the diagonal was kept"
    reference = masked_reference(q, k, v, token_mask(keep_kv, BLOCK, shape["seq_len"], valid_BN))
    torch.testing.assert_close(out_kv[..., : t + 1, :].double(), reference[..., : t + 1, :], **_tolerance(dtype, norm))


def _tolerance(dtype, norm):
    # Large norms make the softmax peaked, where the kernel's own rounding of q.k (in the
    # input dtype) can move weight between near-tied keys: looser for low precision.
    tol = TOLERANCES[dtype]
    return tol if norm == 1.0 or dtype == torch.float32 else dict(atol=0.1, rtol=0.1)


@given(t=st.integers(0, 82), pad=st.integers(0, 20), embed_scale=st.sampled_from([1.0, 100.0]),
       seed=st.integers(0, 2**16))
def test_a_model_never_reads_future_tokens(t, pad, embed_scale, seed):
    """A tiny Llama with left padding: tokens after t changed, logits up to t unchanged.
    LOCAL keeps the same blocks whatever the input, so every position can be checked."""
    compiled = _model(embed_scale)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, 83), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, :pad] = 0
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, 128, (1, 82 - t), generator=gen)
    with torch.no_grad():
        before = compiled(ids, attention_mask=mask).logits
        after = compiled(changed, attention_mask=mask).logits
    assert torch._dynamo.utils.counters["sa_compile"]["rewritten"] >= 2
    _assert_same(after[:, pad : t + 1], before[:, pad : t + 1])


_models = {}


def _model(embed_scale):
    """One compiled model for every example; the weights are graph inputs, so rescaling the
    embedding in place changes the numbers, not the graph."""
    if not _models:
        model = tiny_llama()
        config = SparseConfig(density=0.3, block_size=BLOCK, min_seq_len=0, pattern=PatternKind.LOCAL)
        _models["base"] = model.model.embed_tokens.weight.detach().clone()
        _models["model"] = model
        _models["compiled"] = torch.compile(model, backend=sa_compile.make_backend(config), fullgraph=True)
    with torch.no_grad():
        _models["model"].model.embed_tokens.weight.copy_(_models["base"] * embed_scale)
    return _models["compiled"]
