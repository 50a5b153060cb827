"""generate() through the backend: ``model.compile(backend=...)`` runs the prefill sparse, decode dense."""

import pytest
import torch
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig

from ..helpers import tiny_llama

FULL = SparseConfig(density=1.0, min_seq_len=32, block_size=16)
DECODE = "skipped: query length differs from key length (decode step or cross attention)"


def _tokenized(lengths, seed=0):
    """What a tokenizer returns for a left-padded batch: ids and a 0/1 int64 attention_mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, 128, (len(lengths), width), generator=gen)
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=2, do_sample=False)  # a prefill and a decode step


@pytest.mark.parametrize("lengths", [(70,), (70, 53)], ids=["one prompt", "padded batch of two"])
def test_module_compile_runs_generates_prefill_sparse_and_matches_at_full_density(lengths):
    model = tiny_llama(layers=1)  # every compile counts on a 2-core CI machine
    inputs = _tokenized(lengths)
    expected = _generate(model, inputs)
    model.compile(backend=sa_compile.make_backend(FULL))  # nn.Module.compile: generate() calls the compiled forward
    generated = _generate(model, inputs)
    assert torch.equal(generated, expected)
    assert counters["sa_compile"]["rewritten"] == 1, dict(counters["sa_compile"])  # the prefill graph's layer
    assert counters["sa_compile"]["skipped"] == counters["sa_compile"][DECODE] > 0  # decode graphs, and only they


def test_torch_compile_then_generate_never_reaches_the_backend():
    """Why the docs say ``model.compile``: ``OptimizedModule.generate`` calls the plain module's forward."""
    model = tiny_llama()
    inputs = _tokenized((70,))
    expected = _generate(model, inputs)
    assert torch.equal(_generate(torch.compile(model, backend=sa_compile.make_backend(FULL)), inputs), expected)
    assert not counters["sa_compile"] and not counters["stats"]["unique_graphs"]
