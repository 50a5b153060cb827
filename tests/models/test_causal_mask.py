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


def _windowed(window):
    def attention(q, k, v):
        qi, ki = _positions(q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=((ki <= qi) & (qi - ki < window))[None, None])

    return attention


@pytest.mark.parametrize("window", [8192.0, 100.0, 20.0])
def test_float_windows_are_probed_past_or_rejected(window):
    """A window held as a float is a constant too: past the probe limit the proof gives up,
    below it the probes run past it and see the window."""
    verdict = _prove(_windowed(window), *_qkv())
    expected = "mask subgraph holds a constant past the probe limit (8192)" if window > 4096 else "mask is not plain causal"
    assert verdict == expected


class BufferWindow(torch.nn.Module):
    def __init__(self, window):
        super().__init__()
        self.register_buffer("window", torch.tensor(window))

    def forward(self, q, k, v):
        qi, ki = _positions(q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=((ki <= qi) & (qi - ki < self.window))[None, None])


def test_a_window_in_a_buffer_is_an_input_the_proof_cannot_read():
    assert _prove(BufferWindow(8192), *_qkv()) == "mask reads tensor input 'L_self_buffers_window_'"


@pytest.mark.parametrize("window, expected", [
    (8192, "mask subgraph holds a constant past the probe limit (8192)"),
    (100, "mask is not plain causal"),
    (torch.arange(100), "mask reads a tensor constant of 100 elements"),
])
def test_a_window_in_a_tensor_constant_is_read(window, expected):
    """Graphs may hold the window as a get_attr constant (a lifted tensor): its values count."""
    verdicts = []

    def capture(gm, example_inputs):
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder" and "window" in n.name)
        gm.register_buffer("window_constant", torch.as_tensor(window))
        with gm.graph.inserting_after(placeholder):
            constant = gm.graph.get_attr("window_constant")
        placeholder.replace_all_uses_with(constant)
        call = parse_sdpa(next(n for n in gm.graph.nodes if is_sdpa(n)))
        verdicts.append(prove_causal(gm, call.attn_mask, example_value(call.query).shape[-2]))
        constant.replace_all_uses_with(placeholder)  # run the graph as traced
        return gm

    torch.compile(BufferWindow(8192), backend=capture, fullgraph=True)(*_qkv())
    assert verdicts == [expected]


def test_padding_read_as_equal_to_one_is_rejected():
    """The op takes any nonzero as a real token: a mask that keeps only the value 1 differs
    on an input holding 2 or -1, so the probes hold such values."""
    def equal_one(q, k, v, attention_mask):
        qi, ki = _positions(q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(ki <= qi)[None, None] & (attention_mask == 1)[:, None, None, :])

    verdict = _prove(equal_one, *_qkv(), torch.ones(1, 37, dtype=torch.int64))
    assert verdict == "mask is not plain causal with key padding"
    nonzero = _prove(lambda q, k, v, m: padded_attention(q, k, v, m), *_qkv(), torch.ones(1, 37, dtype=torch.int64))
    assert isinstance(nonzero, CausalMask)


def test_packed_sequence_masks_from_position_ids_are_rejected():
    """HF's packed-sequence mask: tokens see only their own sequence, found from position_ids."""
    def packed(q, k, v, position_ids):
        qi, ki = _positions(q)
        first = position_ids[:, :1] - 1
        sequence_BN = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
        same_BNN = sequence_BN[:, :, None] == sequence_BN[:, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=((ki <= qi)[None] & same_BNN)[:, None])

    position_ids = torch.cat([torch.arange(20), torch.arange(17)])[None]
    verdict = _prove(packed, *_qkv(), position_ids)
    assert verdict == "mask reads 'L_position_ids_' as more than key padding (packed sequences, say)"
