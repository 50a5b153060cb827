"""torch.compile's own ``mode`` and ``options`` reach Inductor through the backend, scoped and checked."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

import sa_compile
from sa_compile import SparseConfig
from sa_compile.compile_backend import inductor_options

from sa_compile.reference import dense_reference

from ..helpers import assert_close, attention_inputs

CFG = SparseConfig(density=1.0, min_seq_len=0, block_size=16)


def _causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _inputs():
    return attention_inputs(0, 1, 2, 2, 64, 16, torch.float32)


def test_options_reach_inductor_for_this_compile_only():
    seen = []

    def spy(graph):  # a post-grad pass: runs inside Inductor, under the backend's patches
        seen.append(inductor_config.coordinate_descent_tuning)

    compiled = torch.compile(_causal, backend=sa_compile.make_backend(CFG), fullgraph=True,
                             options={"coordinate_descent_tuning": True, "post_grad_custom_post_pass": spy})
    q, k, v = _inputs()
    with torch.no_grad():
        out = compiled(q, k, v)
    assert seen and all(seen), "the options did not reach Inductor"
    assert inductor_config.coordinate_descent_tuning is False and inductor_config.post_grad_custom_post_pass is None
    assert counters["sa_compile"]["rewritten"] == 1
    assert_close(out, dense_reference(q, k, v))


def test_a_mode_compiles_and_stays_exact():
    compiled = torch.compile(_causal, backend=sa_compile.make_backend(CFG), mode="reduce-overhead", fullgraph=True)
    q, k, v = _inputs()
    with torch.no_grad():
        assert_close(compiled(q, k, v), dense_reference(q, k, v))
    assert counters["sa_compile"]["rewritten"] == 1


def test_modes_map_to_inductors_own_settings():
    from torch._inductor import list_mode_options

    for mode in ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
        assert inductor_options(mode) == list_mode_options(mode)
    assert inductor_options("default") == inductor_options(None) == {}
    assert inductor_options(None, {"max-autotune": True}, on_cpu=True) == {"max_autotune": True,
                                                                         "epilogue_fusion": False}


@pytest.mark.parametrize("mode, options, named", [
    ("fastest", None, "'fastest'"),
    (None, {"no_such_option": 1}, "'no_such_option'"),
    (None, {"max_autotune": "yes"}, "'max_autotune'"),
    (None, {"epilogue_fusion": True}, "'epilogue_fusion'"),  # the CPU FlexAttention template cannot
])
def test_options_it_cannot_honour_raise_value_error_naming_them(mode, options, named):
    gm = torch.fx.symbolic_trace(_causal)
    with pytest.raises(ValueError, match=named):
        sa_compile.backend(gm, list(_inputs()), mode=mode, options=options)
    compiled = torch.compile(_causal, backend=sa_compile.backend, mode=mode, options=options)
    with pytest.raises(ValueError, match=named):  # as raised: not wrapped in BackendCompilerFailed
        compiled(*_inputs())
    assert not counters["sa_compile"], "a refused option must fail before any rewrite"
