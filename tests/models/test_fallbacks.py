"""Every SDPA the sparse path does not cover stays dense: counted, reasoned, exact."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig

from ..helpers import tiny_llama

CFG = SparseConfig(density=0.3, min_seq_len=0, block_size=16)
EXACT = dict(atol=1e-5, rtol=1e-5)


def _run(fn, *args, config=CFG, dynamic=False):
    compiled = torch.compile(fn, backend=sa_compile.make_backend(config), fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        return compiled(*args), fn(*args)


def _assert_skipped(reason: str, count: int = 1):
    assert counters["sa_compile"]["rewritten"] == 0
    assert counters["sa_compile"]["skipped"] == count
    assert counters["sa_compile"][f"skipped: {reason}"] == count, dict(counters["sa_compile"])


def _qkv(n=64, d=16, dtype=torch.float32, kv_len=None):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, n, d, generator=gen, dtype=dtype)
    kv = [torch.randn(1, 2, kv_len or n, d, generator=gen, dtype=dtype) for _ in range(2)]
    return q, *kv


def _causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


CASES = {
    "attention is not causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _qkv()),
    "query length differs from key length (decode step or cross attention)": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _qkv(n=1, kv_len=64)),
    "unsupported head dim ['24']": (_causal, _qkv(d=24)),
    "unsupported dtype torch.float64": (_causal, _qkv(dtype=torch.float64)),
    "mask is not plain causal": (
        lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(64, 64, dtype=torch.bool).tril(-3)), _qkv()),
}


@pytest.mark.parametrize("reason", list(CASES))
def test_unsupported_calls_are_counted_and_exact(reason):
    fn, args = CASES[reason]
    actual, expected = _run(fn, *args)
    _assert_skipped(reason)
    torch.testing.assert_close(actual, expected, **EXACT)


def test_masks_read_from_tensor_inputs_stay_dense():
    q, k, v = _qkv()
    mask = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[..., 0] = True
    actual, expected = _run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    _assert_skipped("mask reads tensor input 'L_m_'")
    torch.testing.assert_close(actual, expected, **EXACT)


def test_dropout_stays_dense():
    q, k, v = _qkv()
    actual, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5), q, k, v)
    _assert_skipped("dropout is not zero")
    assert actual.shape == q.shape and torch.isfinite(actual).all()


def test_short_static_prompts_stay_dense():
    actual, expected = _run(_causal, *_qkv(), config=SparseConfig(density=0.3, min_seq_len=65, block_size=16))
    _assert_skipped("prompt shorter than min_seq_len")
    torch.testing.assert_close(actual, expected, **EXACT)


def test_key_padding_under_dynamic_shapes_on_cpu_stays_dense():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, :9] = 0
    compiled = torch.compile(model, backend=sa_compile.make_backend(CFG), fullgraph=True, dynamic=True)
    with torch.no_grad():
        actual = compiled(ids, attention_mask=mask).logits
        expected = model(ids, attention_mask=mask).logits
    assert counters["sa_compile"]["rewritten"] == 0
    assert counters["sa_compile"]["skipped: key padding with dynamic shapes on CPU"] == 2
    torch.testing.assert_close(actual[:, 9:], expected[:, 9:], **EXACT)


def test_each_skip_reason_is_logged_once(caplog):
    from sa_compile import eligibility

    eligibility.forget_logged()
    fn, args = CASES["attention is not causal"]
    with caplog.at_level("WARNING", logger="sa_compile"):
        _run(fn, *args)
        torch._dynamo.reset()
        _run(fn, *args)
    assert sum("attention is not causal" in r.message for r in caplog.records) == 1


def test_training_graphs_stay_dense_and_gradients_match():
    """The BlockMask has no backward indices: a graph that needs gradients stays on SDPA."""
    model = tiny_llama().train()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=sa_compile.make_backend(CFG), fullgraph=True)
    compiled(ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert counters["sa_compile"]["skipped: gradients are enabled (the sparse op has no backward)"] == 2
    assert counters["sa_compile"]["rewritten"] == 0
    for actual, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _checkpointed(q, k, v):
    return torch.utils.checkpoint.checkpoint(_attention, q, k, v, use_reentrant=False)


def _conditional(q, k, v):
    return torch.cond(q.sum() > 0, _attention, lambda q, k, v: _attention(q, k, v) * 2, (q, k, v))


@pytest.mark.parametrize("fn, count", [(_checkpointed, 1), (_conditional, 2)])
def test_sdpa_inside_higher_order_ops_is_counted(fn, count):
    """Activation checkpointing and cond trace SDPA into subgraphs the rewrite leaves alone."""
    actual, expected = _run(fn, *_qkv())
    _assert_skipped("inside a higher-order op subgraph (activation checkpointing, cond, ...)", count)
    torch.testing.assert_close(actual, expected, **EXACT)


def test_a_contiguous_view_of_a_2d_buffer_stays_dense_on_cpu():
    """Inductor's CPU FlexAttention template reads q's sizes off its buffer: a one-head q, a
    contiguous view of a matmul output, has no 4-D buffer to copy (a transposed view does)."""
    torch.manual_seed(0)
    q_proj, kv_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 32)

    def one_head(x):
        q = q_proj(x).view(1, x.shape[1], 1, 16).transpose(1, 2)
        k, v = kv_proj(x).view(1, x.shape[1], 2, 16).transpose(1, 2).split(1, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    actual, expected = _run(one_head, torch.randn(1, 64, 16))
    _assert_skipped("query is a contiguous view of a 2-D buffer (CPU FlexAttention cannot read it)")
    torch.testing.assert_close(actual, expected, **EXACT)


def test_packed_sequences_from_position_ids_stay_dense():
    """HF builds a packed-sequence mask from position_ids (no attention_mask, no cache): each
    token sees only its own sequence. That is not plain causal, and it is counted."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(30), torch.arange(18)])[None]
    compiled = torch.compile(model, backend=sa_compile.make_backend(CFG), fullgraph=True)
    with torch.no_grad():
        actual = compiled(ids, position_ids=position_ids, use_cache=False).logits
        expected = model(ids, position_ids=position_ids, use_cache=False).logits
    _assert_skipped("mask reads 'L_kwargs_position_ids_' as more than key padding (packed sequences, say)", 2)
    torch.testing.assert_close(actual, expected, **EXACT)
