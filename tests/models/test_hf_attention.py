"""attn_implementation="sa_compile": prefill through the sparse op, everything else dense, all counted."""

import pytest
import torch
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig
from sa_compile.hf_attention import make_attention, plan_call, prefill_mask

from ..helpers import tiny_llama

FULL = SparseConfig(density=1.0, min_seq_len=32, block_size=16)
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)  # float32 model, float32 kernels
DECODE = "skipped: query length differs from key length (decode step or cross attention)"


@pytest.fixture(scope="module", autouse=True)
def registered():
    return sa_compile.register(FULL)


def _ids(batch, length, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_prefill_is_sparse_exact_at_full_density_and_compiled_once_for_all_lengths():
    model = tiny_llama()
    for n in (80, 101):  # one dynamic graph serves both lengths
        ids = _ids(1, n, seed=n)
        expected = _logits(model, "sdpa", ids)
        actual = _logits(model, "sa_compile", ids, attention_mask=torch.ones_like(ids))
        torch.testing.assert_close(actual, expected, **LOGIT_TOL)
    assert counters["sa_compile"]["rewritten"] == 4 and counters["sa_compile"]["skipped"] == 0
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("cache", [None, "static"])  # an empty static cache holds more slots than the prompt
def test_generate_runs_the_prefill_sparse_and_decode_steps_dense(cache):
    model = tiny_llama()
    ids = _ids(1, 70)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # as a tokenizer returns them
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation=cache)
        model.set_attn_implementation("sa_compile")
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation=cache)
    assert torch.equal(generated, expected)
    assert counters["sa_compile"]["rewritten"] == 2  # the prefill's two layers
    assert counters["sa_compile"][DECODE] == counters["sa_compile"]["skipped"] == 2 * 3  # three decode steps


def test_from_pretrained_loads_it_and_short_prompts_stay_dense(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sa_compile")
    assert model.config._attn_implementation == "sa_compile"
    ids = _ids(1, 20)  # below min_seq_len
    torch.testing.assert_close(_logits(model, "sa_compile", ids), _logits(model, "sdpa", ids), **LOGIT_TOL)
    assert counters["sa_compile"]["skipped: prompt shorter than min_seq_len"] == 2
    assert counters["sa_compile"]["rewritten"] == 0


def test_padded_batch_stays_exact_where_the_cpu_cannot_serve_its_padding():
    model = tiny_llama()
    ids = _ids(2, 64)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding, as generate() wants it
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        model.set_attn_implementation("sa_compile")
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)
    assert counters["sa_compile"]["skipped: key padding with dynamic shapes on CPU"] == 2
    assert counters["sa_compile"][DECODE] == 2 * 2


def test_the_mask_is_key_padding_for_a_plain_prefill_and_sdpas_otherwise():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    valid_BN = torch.ones(2, 6, dtype=torch.bool)
    assert prefill_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=valid_BN) is None
    valid_BN[1, :2] = False
    assert torch.equal(prefill_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=valid_BN), valid_BN)
    for other in (dict(q_length=1, kv_length=6, q_offset=5),  # a decode step
                  dict(q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(3))):
        arguments = dict(batch_size=2, attention_mask=valid_BN, **other)
        assert torch.equal(prefill_mask(**arguments), sdpa_mask(**arguments))


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(n=48, kv_len=None):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, n, 16, generator=gen), torch.randn(1, 2, kv_len or n, 16, generator=gen),
            torch.randn(1, 2, kv_len or n, 16, generator=gen))


def _reference(q, k, v, scale=0.25, softcap=None, window=None):
    n = q.shape[-2]
    logits = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    pos = torch.arange(n)
    visible = (pos[:, None] >= pos[None]) & (pos[:, None] - pos[None] < (window or n))
    return (torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ v.double().repeat_interleave(2, 1))


def _window_mask(n, window):
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    return sdpa_mask(batch_size=1, q_length=n, kv_length=n, allow_is_causal_skip=False,
                     mask_function=sliding_window_causal_mask_function(window))


@pytest.mark.parametrize("kwargs, reason", [
    (dict(softcap=20.0), "logit softcapping"),
    (dict(sliding_window=16), "sliding window shorter than the prompt"),
    (dict(is_causal=False), "attention is not causal"),
])
def test_arguments_it_cannot_serve_exactly_run_dense_and_are_counted(kwargs, reason):
    q, k, v = _qkv()
    window = kwargs.get("sliding_window")
    mask = None if window is None else _window_mask(q.shape[-2], window)  # the mask transformers builds
    with torch.no_grad():
        out, _ = make_attention(FULL)(_Module(), q, k, v, mask, scaling=0.25, **kwargs)
    assert counters["sa_compile"][f"skipped: {reason}"] == 1 and counters["sa_compile"]["rewritten"] == 0
    if kwargs.get("is_causal") is False:
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    else:
        expected = _reference(q, k, v, softcap=kwargs.get("softcap"), window=window)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected.double(), atol=1e-5, rtol=1e-5)


def test_what_it_serves():
    q, k, v = _qkv()
    module = _Module()
    assert plan_call(FULL, module, q, k, v, None, sliding_window=48)[0] is k  # a window that holds the prompt
    assert isinstance(plan_call(FULL, module, q, k, v, None, dropout=0.1), str)
    q.requires_grad_(True)
    assert plan_call(FULL, module, q, k, v, None) == "gradients are enabled (the sparse op has no backward)"
    q, k, v = _qkv(n=40, kv_len=64)  # an empty static cache: slots past the prompt, no mask
    served_k, served_v, valid = plan_call(FULL, module, q, k, v, None)
    assert served_k.shape[-2] == served_v.shape[-2] == 40 and valid is None


def test_softcapping_models_match_their_eager_attention():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=32, attn_logit_softcapping=20.0, max_position_embeddings=1024)
    model = Gemma2ForCausalLM(config).eval()
    ids = _ids(1, 48)
    torch.testing.assert_close(_logits(model, "sa_compile", ids), _logits(model, "eager", ids), **LOGIT_TOL)
    assert counters["sa_compile"]["skipped: logit softcapping"] == 2


def test_register_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="patterns"):
        sa_compile.register(SparseConfig(patterns="table.json"))
    with pytest.raises(ValueError, match="name='sdpa'"):
        sa_compile.register(FULL, name="sdpa")
