"""The backend's counters count attention calls, as the attention implementation's do: each
SDPA of a compiled graph once per call of the graph, and a graph that serves only prompts below
min_seq_len counts its SDPA calls as skipped, not rewritten."""

import torch
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig

from ..helpers import tiny_llama

SHORT = "skipped: prompt shorter than min_seq_len"


def _ids(length, seed=0):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _compile_dynamic(model, config):
    return torch.compile(model, backend=sa_compile.make_backend(config), fullgraph=True, dynamic=True)


def test_a_dynamic_graph_counts_each_sdpa_call_once_per_call():
    """Under dynamic=True Dynamo hands the backend the same graph twice (it restarts its trace
    from inside Inductor); only the calls of the graph that serves count."""
    model = tiny_llama()  # 2 layers: 2 SDPA calls per prefill
    compiled = _compile_dynamic(model, SparseConfig(density=0.3, block_size=16, min_seq_len=0))
    with torch.no_grad():
        sparse = compiled(_ids(64)).logits
        assert dict(counters["sa_compile"]) == {"rewritten": 2}
        assert (sparse - model(_ids(64)).logits).abs().max() > 1e-3, "the prefill did not run sparse"
        compiled(_ids(96))  # the same dynamic graph: nothing compiles, its two SDPA calls count
    assert dict(counters["sa_compile"]) == {"rewritten": 4}
    assert counters["stats"]["unique_graphs"] == 1


def test_a_graph_for_prompts_below_min_seq_len_counts_them_as_skipped():
    model = tiny_llama()
    compiled = _compile_dynamic(model, SparseConfig(density=0.3, block_size=16, min_seq_len=64))
    with torch.no_grad():
        short = compiled(_ids(40)).logits
        torch.testing.assert_close(short, model(_ids(40)).logits, atol=1e-4, rtol=1e-4)
        assert counters["sa_compile"]["rewritten"] == 0
        assert counters["sa_compile"]["skipped"] == counters["sa_compile"][SHORT] == 2
        long = compiled(_ids(150)).logits  # past the length guard: a second graph, sparse
        assert counters["sa_compile"]["rewritten"] == 2 and counters["sa_compile"]["skipped"] == 2
        assert (long - model(_ids(150)).logits).abs().max() > 1e-3, "the long prompt did not run sparse"
        compiled(_ids(45))  # the first graph again
    assert counters["sa_compile"]["rewritten"] == 2 and counters["sa_compile"][SHORT] == 4
    assert counters["stats"]["unique_graphs"] == 2
