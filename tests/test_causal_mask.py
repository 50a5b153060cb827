"""The causal-mask proof: accepts causal (and causal + key padding) masks, rejects the rest."""

import pytest
import torch
import torch.nn.functional as F

from sa_compile.passes.causal_mask import CausalMask, prove_causal
from sa_compile.passes.matchers import example_value, is_sdpa, parse_sdpa


def _prove(fn, *args, dynamic=False):
    """Capture fn's Dynamo graph and run the proof on its (single) SDPA mask."""
    verdicts = []

    def capture(gm, example_inputs):
        node = next(n for n in gm.graph.nodes if is_sdpa(n))
        call = parse_sdpa(node)
        verdicts.append(prove_causal(gm, call.attn_mask, example_value(call.query).shape[-2]))
        return gm

    torch.compile(fn, backend=capture, dynamic=dynamic, fullgraph=True)(*args)
    return verdicts[0]


def _qkv(n=37):
    return torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)


def _positions(q):
    pos = torch.arange(q.shape[-2])
    return pos[:, None], pos[None, :]


def causal_attention(q, k, v):
    qi, ki = _positions(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(ki <= qi)[None, None])


def windowed_attention(q, k, v, window=100):
    qi, ki = _positions(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=((ki <= qi) & (qi - ki < window))[None, None])


def padded_attention(q, k, v, attention_mask):
    qi, ki = _positions(q)
    mask = (ki <= qi)[None, None] & attention_mask.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def additive_attention(q, k, v):
    qi, ki = _positions(q)
    bias = torch.zeros(q.shape[-2], q.shape[-2]).masked_fill(ki > qi, torch.finfo(torch.float32).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def input_mask_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def anti_causal_attention(q, k, v):
    qi, ki = _positions(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(ki >= qi)[None, None])


@pytest.mark.parametrize("dynamic", [False, True])
def test_causal_masks_are_proven(dynamic):
    assert _prove(causal_attention, *_qkv(), dynamic=dynamic) == CausalMask(padding=None)
    assert _prove(additive_attention, *_qkv(), dynamic=dynamic) == CausalMask(padding=None)


@pytest.mark.parametrize("dynamic", [False, True])
def test_causal_mask_with_key_padding_names_the_padding_input(dynamic):
    verdict = _prove(padded_attention, *_qkv(), torch.ones(1, 37, dtype=torch.int64), dynamic=dynamic)
    assert isinstance(verdict, CausalMask) and verdict.padding is not None
    assert verdict.padding.op == "placeholder"


@pytest.mark.parametrize("window", [8, 100])
def test_sliding_windows_are_rejected_even_when_wider_than_the_prompt(window):
    verdict = _prove(lambda q, k, v: windowed_attention(q, k, v, window), *_qkv())
    assert verdict == "mask is not plain causal"


def test_masks_from_tensor_inputs_and_anti_causal_masks_are_rejected():
    mask = torch.ones(1, 1, 37, 37, dtype=torch.bool).tril()
    assert "reads tensor input" in _prove(input_mask_attention, *_qkv(), mask)
    assert _prove(anti_causal_attention, *_qkv()) == "mask is not plain causal"
