"""A tiny random HF Llama through the backend: rewritten, graph-break free, and right."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

import sa_compile
from sa_compile import SparseConfig
from sa_compile.hf_cache import cache_argument

from ..helpers import DEVICES, sqnr_db, tiny_llama

FULL = SparseConfig(density=1.0, min_seq_len=0, block_size=16)
# The default config, but sparse from the first token and with blocks a tiny prompt can hold.
DEFAULT_SMALL = SparseConfig(min_seq_len=0, block_size=16)
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)  # float32 model, float32 kernels


def _compile(model, config, **kwargs):
    return torch.compile(model, backend=sa_compile.make_backend(config), fullgraph=True, **kwargs)


def _ids(batch, length, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_attention_mask", [True, False])
def test_full_density_matches_eager_and_every_attention_is_rewritten(with_attention_mask, device):
    model = tiny_llama().to(device)
    ids = _ids(1, 77 if device == "cpu" else 613).to(device)
    kwargs = {"attention_mask": torch.ones_like(ids)} if with_attention_mask else {}
    config = FULL if device == "cpu" else SparseConfig(density=1.0, min_seq_len=0, block_size=128)
    with torch.no_grad():
        expected = model(ids, **kwargs).logits
        actual = _compile(model, config)(ids, **kwargs).logits
    assert counters["sa_compile"]["rewritten"] == 2 and counters["sa_compile"]["skipped"] == 0
    assert counters["stats"]["unique_graphs"] == 1, "the model did not compile to one graph"
    torch.testing.assert_close(actual, expected, **LOGIT_TOL)


@pytest.mark.parametrize("with_attention_mask", [True, False])
def test_the_rewrite_reads_unrepeated_keys_and_values(with_attention_mask):
    """GQA stays native: the sparse op gets the 2 KV heads, not HF's 4 repeated copies.

    With an attention_mask HF repeats k/v (expand + reshape) before SDPA; without one it
    passes enable_gqa=True. Both must reach the op with 2 heads.
    """
    from torch._inductor.compile_fx import compile_fx

    from sa_compile.passes import run_passes
    from sa_compile.sparse_op import rewritten_sdpa

    seen = []

    def inspect(gm, example_inputs):
        gm = run_passes(gm, example_inputs, config=FULL)
        for node in gm.graph.nodes:
            if node.target is rewritten_sdpa:
                q, k, v = (a.meta["example_value"] for a in node.args[:3])
                seen.append((q.shape[1], k.shape[1], v.shape[1]))
        assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes)
        return compile_fx(gm, example_inputs, config_patches={"epilogue_fusion": False})

    ids = _ids(1, 50)
    kwargs = {"attention_mask": torch.ones_like(ids)} if with_attention_mask else {}
    with torch.no_grad():
        torch.compile(tiny_llama(), backend=inspect, fullgraph=True)(ids, **kwargs)
    assert seen == [(4, 2, 2), (4, 2, 2)]


def test_default_density_is_finite_and_close():
    model = tiny_llama()
    ids = _ids(1, 301)
    with torch.no_grad():
        expected = model(ids).logits
        actual = _compile(model, DEFAULT_SMALL)(ids).logits
    assert counters["sa_compile"]["rewritten"] == 2
    assert torch.isfinite(actual).all()
    # A random-weight model attends diffusely, the worst case for any sparse pattern: at
    # the floor budget (sink + diagonal of 19 blocks, 19% of the grid) we measured 9.1 dB.
    assert sqnr_db(actual, expected) > 7.0
    assert sqnr_db(actual, expected) < 60.0, "the sparse path computed dense attention"


def test_batch_with_real_padding_is_correct():
    model = tiny_llama()
    ids = _ids(2, 83)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :20] = 0  # left padding
    attention_mask[1, -31:] = 0  # right padding
    with torch.no_grad():
        expected = model(ids, attention_mask=attention_mask).logits
        actual = _compile(model, FULL)(ids, attention_mask=attention_mask).logits
    assert counters["sa_compile"]["rewritten"] == 2
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], **LOGIT_TOL)


def test_cached_prefill_after_a_sparse_prefill():
    """A prefill into a KV cache; generate() itself is tested in test_generate.py (torch.compile(model).generate
    would not reach the backend)."""
    model = tiny_llama()
    ids = _ids(1, 70)
    compiled = _compile(model, FULL)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        first = compiled(ids, use_cache=True, logits_to_keep=1, **cache_argument(compiled, cache)).logits
        assert counters["sa_compile"]["rewritten"] == 2
        torch.testing.assert_close(first, model(ids).logits[:, -1:], **LOGIT_TOL)
    assert cache.get_seq_length() == 70


def test_min_seq_len_guards_a_dynamic_graph():
    model = tiny_llama()
    cfg = SparseConfig(density=0.3, min_seq_len=64, block_size=16)
    compiled = _compile(model, cfg, dynamic=True)
    with torch.no_grad():
        short, long = _ids(1, 40), _ids(1, 150)
        torch.testing.assert_close(compiled(short).logits, model(short).logits, **LOGIT_TOL)
        sparse = compiled(long).logits
        assert (sparse - model(long).logits).abs().max() > 1e-2, "the long prompt did not run sparse"
        torch.testing.assert_close(compiled(_ids(1, 45)).logits, model(_ids(1, 45)).logits, **LOGIT_TOL)
    assert counters["stats"]["unique_graphs"] <= 2
