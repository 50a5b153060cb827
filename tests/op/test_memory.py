"""chunk_mlp: the same logits in less memory, eager and compiled."""

import pytest
import torch

import sa_compile
from sa_compile import SparseConfig

from ..helpers import tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)  # float32; the MLP acts per token, only matmul blocking changes


def _ids(n):
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(n))


def test_chunked_mlp_gives_the_same_logits_eager():
    model = tiny_llama()
    with torch.no_grad():
        expected = model(_ids(77)).logits
        sa_compile.chunk_mlp(model, chunks=3, min_tokens=8)
        assert model.model.layers[0].mlp._sa_compile_chunks == 3
        torch.testing.assert_close(model(_ids(77)).logits, expected, **TOL)
        short = _ids(5)  # below min_tokens: the MLP runs whole
        torch.testing.assert_close(model(short).logits, tiny_llama()(short).logits, **TOL)


def test_chunked_mlp_really_splits_the_sequence(monkeypatch):
    model = sa_compile.chunk_mlp(tiny_llama(layers=1), chunks=4, min_tokens=8)
    mlp = model.model.layers[0].mlp
    seen = []
    original = mlp._sa_compile_unchunked_forward
    mlp._sa_compile_unchunked_forward = lambda x: (seen.append(x.shape[-2]), original(x))[1]
    with torch.no_grad():
        model(_ids(30))
    assert seen == [8, 8, 7, 7]


def test_chunked_mlp_compiles_with_the_sparse_backend_dynamic():
    model = tiny_llama()
    with torch.no_grad():
        expected = {n: model(_ids(n)).logits for n in (40, 70)}
    sa_compile.chunk_mlp(model, chunks=2, min_tokens=16)
    backend = sa_compile.make_backend(SparseConfig(density=1.0, block_size=16, min_seq_len=0))
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for n, logits in expected.items():
            torch.testing.assert_close(compiled(_ids(n)).logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{"chunks": 0}, {"chunks": 2.0}, {"min_tokens": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="chunk_mlp"):
        sa_compile.chunk_mlp(tiny_llama(), **kwargs)


def test_other_models_raise_type_error():
    with pytest.raises(TypeError, match="Hugging Face Llama"):
        sa_compile.chunk_mlp(torch.nn.Linear(2, 2))
