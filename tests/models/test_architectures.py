"""Tiny random Hugging Face models beyond Llama: every attention call is rewritten where it
is causal self-attention (exact at density 1.0, causal at a sparse density) or left dense
with a counted reason."""

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import PatternKind, SparseConfig

LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)
DENSE = SparseConfig(density=1.0, min_seq_len=0, block_size=16)
# LOCAL keeps the same blocks whatever the input, so a sparse run can be checked for
# causality by perturbing the future: rows after the perturbation may change, none before.
SPARSE = SparseConfig(density=0.3, min_seq_len=0, block_size=16, pattern=PatternKind.LOCAL)
LENGTH = 100


def _llama_like(config_cls, model_cls, **extra):
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa")
    return lambda: model_cls(config_cls(**{**fields, **extra}))


MODELS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=4,
                                                     attn_implementation="sdpa")),
    "qwen2": _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16),  # q/k RMS norms
    "mistral": _llama_like(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=None),
    "gemma": _llama_like(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=16),
    "phi3": _llama_like(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0),  # fused qkv_proj
}
DENSE_MODELS = {
    "mistral, 64-token window": (_llama_like(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=64),
                                 "mask is not plain causal"),
    "phi3, head dim 96": (_llama_like(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0, hidden_size=192,
                                      num_attention_heads=2, num_key_value_heads=2), "unsupported head dim ['96']"),
}


def _build(factory):
    torch.manual_seed(0)
    return factory().eval()


def _ids(length=LENGTH, seed=0):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _compiled(model, config):
    return torch.compile(model, backend=sa_compile.make_backend(config), fullgraph=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_density_is_exact_and_every_attention_is_rewritten(name):
    model = _build(MODELS[name])
    with torch.no_grad():
        actual = _compiled(model, DENSE)(_ids()).logits
        expected = model(_ids()).logits
    assert dict(counters["sa_compile"]) == {"rewritten": 1}
    torch.testing.assert_close(actual, expected, **LOGIT_TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_sparse_density_is_causal(name):
    """Changing the tokens after position t leaves every logit up to t as it was."""
    model = _build(MODELS[name])
    compiled = _compiled(model, SPARSE)
    ids = _ids()
    with torch.no_grad():
        reference = compiled(ids).logits
        assert counters["sa_compile"]["rewritten"] == 1
        assert (reference - model(ids).logits).abs().max() > 1e-3, "the sparse run computed dense attention"
        for t in (0, 15, 16, 47, 80, LENGTH - 2):
            perturbed = torch.cat([ids[:, : t + 1], _ids(LENGTH - t - 1, seed=t + 1)], dim=1)
            logits = compiled(perturbed).logits
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], atol=0, rtol=0)
            assert not torch.equal(logits[:, t + 1 :], reference[:, t + 1 :])


@pytest.mark.parametrize("name", list(DENSE_MODELS))
def test_attention_the_sparse_path_cannot_serve_stays_dense_and_exact(name):
    factory, reason = DENSE_MODELS[name]
    model = _build(factory)
    with torch.no_grad():
        actual = _compiled(model, DENSE)(_ids()).logits
        expected = model(_ids()).logits
    assert dict(counters["sa_compile"]) == {"skipped": 1, f"skipped: {reason}": 1}
    torch.testing.assert_close(actual, expected, **LOGIT_TOL)
