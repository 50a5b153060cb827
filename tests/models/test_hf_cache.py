"""The KV cache keyword (sa_compile.hf_cache): the name the installed transformers takes, no deprecated one."""

import warnings

import torch
from transformers import DynamicCache

from sa_compile.hf_cache import cache_argument, output_cache

from ..helpers import tiny_llama


class _Renamed(torch.nn.Module):
    def forward(self, input_ids, cache=None, **kwargs):
        return input_ids


class _Old(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, **kwargs):
        return input_ids


def test_the_keyword_follows_the_forward_and_looks_through_compile():
    assert cache_argument(_Renamed(), "c") == {"cache": "c"}
    assert cache_argument(_Old(), "c") == {"past_key_values": "c"}
    assert cache_argument(torch.compile(_Renamed()), "c") == {"cache": "c"}
    assert output_cache({"logits": 1, "cache": "c"}) == "c"
    assert output_cache({"logits": 1, "past_key_values": "c"}) == "c"
    assert output_cache({"logits": 1}) is None


def test_a_real_model_fills_the_cache_it_is_given_without_a_deprecation_warning():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        out = model(ids, use_cache=True, **cache_argument(model, cache))
        step = model(ids[:, -1:], use_cache=True, **cache_argument(model, output_cache(out)))
    assert output_cache(out) is cache and cache.get_seq_length() == 13  # the prompt, then one step
    assert step.logits.shape == (1, 1, 128)
