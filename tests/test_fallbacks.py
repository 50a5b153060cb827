"""Every SDPA the sparse path does not cover stays dense: counted, reasoned, exact."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig

from .helpers import tiny_llama

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
    assert counters["sa_compile"]["skipped: key padding with dynamic shapes on CPU"] >= 2
    torch.testing.assert_close(actual[:, 9:], expected[:, 9:], **EXACT)


def test_each_skip_reason_is_logged_once(caplog):
    from sa_compile import _log

    _log._seen.discard("sa_compile: SDPA left dense: attention is not causal")
    fn, args = CASES["attention is not causal"]
    with caplog.at_level("WARNING", logger="sa_compile"):
        _run(fn, *args)
        torch._dynamo.reset()
        _run(fn, *args)
    assert sum("attention is not causal" in r.message for r in caplog.records) == 1
