"""What a new user meets: new lengths, calls after generate(), logits_to_keep, padded batches,
configuration by name, the verb, counters that mean the same in both entry points, and logging."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig, eligibility

from ..helpers import tiny_llama

FULL = SparseConfig(density=1.0, min_seq_len=0, block_size=16)
DECODE = f"skipped: {eligibility.DECODE}"
LOGITS = dict(atol=1e-4, rtol=1e-4)
GPU = SparseConfig(min_seq_len=0, block_size=128)


def _ids(length, batch=1, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, mask, tokens=3):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False)


def _graph_plans(seen):
    """A backend that records, per SDPA node, what the pass decides on a GPU (plan or reason),
    and runs the graph uncompiled: the proof is checked without Inductor's CPU limits."""
    from sa_compile.passes.matchers import is_sdpa
    from sa_compile.passes.sparse_sdpa import plan_rewrite

    def spy(gm, example_inputs):
        seen.extend(plan_rewrite(gm, n, GPU, on_cpu=False) for n in list(gm.graph.nodes) if is_sdpa(n))
        return gm.forward
    return spy


def test_a_second_length_with_the_tokenizers_mask_is_proven_causal():
    """Case 1: the recompile with dynamic shapes gives attention_mask a length symbol of its own."""
    seen = []
    model = tiny_llama(layers=1)
    model.compile(backend=_graph_plans(seen))
    with torch.no_grad():
        for n in (48, 80):
            model(_ids(n), attention_mask=torch.ones(1, n, dtype=torch.long))
    assert len(seen) == 2 and not any(isinstance(plan, str) for plan in seen), seen
    assert counters["stats"]["unique_graphs"] == 2  # the second one dynamic


def test_a_second_length_on_the_cpu_warns_once_with_what_to_change(caplog):
    model = tiny_llama(layers=1)
    model.compile(backend=sa_compile.make_backend(FULL))
    eligibility.forget_logged()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sa_compile"):
        for n in (48, 80, 96):
            model(_ids(n), attention_mask=torch.ones(1, n, dtype=torch.long))
    assert counters["sa_compile"]["rewritten"] == 1
    assert counters["sa_compile"][f"skipped: {eligibility.PADDING_ON_CPU}"] == 2  # two calls of the dynamic graph
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dynamic=False" in warnings[0], warnings


def test_new_lengths_with_dynamic_false_run_sparse_on_the_cpu():
    model, eager = tiny_llama(layers=1), tiny_llama(layers=1)
    model.compile(backend=sa_compile.make_backend(FULL), dynamic=False)
    with torch.no_grad():
        for n in (48, 80):
            ids, mask = _ids(n), torch.ones(1, n, dtype=torch.long)
            torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                       eager(ids, attention_mask=mask).logits, **LOGITS)
    assert dict(counters["sa_compile"]) == {"rewritten": 2}


def test_logits_to_keep_after_generate_runs_sparse_and_exact():
    """Case 2: the mask reads ``inputs_embeds.shape[1]``, a size, not the embedding's weights."""
    model = tiny_llama(layers=1)
    ids, mask = _ids(64), torch.ones(1, 64, dtype=torch.long)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, logits_to_keep=1).logits
    model.compile(backend=sa_compile.make_backend(FULL))
    _generate(model, ids, mask)
    counters.clear()
    with torch.no_grad():
        actual = model(ids, attention_mask=mask, logits_to_keep=1).logits
    assert dict(counters["sa_compile"]) == {"rewritten": 1}
    torch.testing.assert_close(actual, expected, **LOGITS)


def test_a_padded_batch_runs_sparse_and_exact_where_it_is_not_padded():
    model = tiny_llama(layers=1)
    ids, mask = _ids(64, batch=2), torch.ones(2, 64, dtype=torch.long)
    mask[1, :20] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.compile(backend=sa_compile.make_backend(FULL))
        actual = model(ids, attention_mask=mask).logits
    assert dict(counters["sa_compile"]) == {"rewritten": 1}
    torch.testing.assert_close(actual[:, 20:], expected[:, 20:], **LOGITS)


def test_options_by_name_reach_the_config_and_inductor():
    model = tiny_llama(layers=1)
    ids = _ids(64)
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="sa_compile",
                                 options={"density": 1.0, "min_seq_len": 0, "block_size": 16, "max_autotune": False})
        torch.testing.assert_close(compiled(ids).logits, expected, **LOGITS)
    assert dict(counters["sa_compile"]) == {"rewritten": 1}  # the default min_seq_len would leave it dense


@pytest.mark.parametrize("options, named", [({"densty": 0.5}, "'densty'"), ({"density": 7}, "density")])
def test_a_bad_option_by_name_is_a_value_error_naming_the_fields(options, named):
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match=named) as raised, torch.no_grad():
        torch.compile(model, backend="sa_compile", options=options)(_ids(32))
    assert "BackendCompilerFailed" not in type(raised.value).__name__
    if "densty" in options:
        assert "min_seq_len" in str(raised.value) and "block_size" in str(raised.value)
    assert not counters["sa_compile"]


def test_sparsify_runs_forward_and_generate_sparse_and_exact_at_full_density():
    model = tiny_llama(layers=1, attn_implementation="eager")
    ids, mask = _ids(64), torch.ones(1, 64, dtype=torch.long)
    expected = _generate(model, ids, mask)
    assert sa_compile.sparsify_(model, {"density": 1.0, "min_seq_len": 0, "block_size": 16}) is model
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_generate(model, ids, mask), expected)
    assert counters["sa_compile"]["rewritten"] == 1 and counters["sa_compile"][DECODE] == 2  # two decode steps


@pytest.mark.parametrize("call, named", [
    (lambda m: sa_compile.sparsify_(m, {"densty": 0.1}), "densty"),
    (lambda m: sa_compile.sparsify_(torch.compile(m)), "wrapper"),
    (lambda m: sa_compile.sparsify_(m, backend="inductor"), "backend"),
])
def test_sparsify_refuses_what_would_not_run_sparse(call, named):
    with pytest.raises(ValueError, match=named):
        call(tiny_llama(layers=1))


def test_counters_count_calls_the_same_in_both_entry_points():
    ids, mask = _ids(64), torch.ones(1, 64, dtype=torch.long)
    model = tiny_llama()
    model.compile(backend=sa_compile.make_backend(FULL))
    _generate(model, ids, mask, tokens=4)
    through_backend = dict(counters["sa_compile"])
    counters.clear()
    sa_compile.register(FULL, name="sa_compile_counted")
    model = tiny_llama(attn_implementation="sa_compile_counted")
    _generate(model, ids, None, tokens=4)  # unpadded: no mask, as the CPU's compiled prefill needs
    assert dict(counters["sa_compile"]) == through_backend  # every attention call, once
    assert through_backend["rewritten"] == 2 and through_backend["skipped"] == through_backend[DECODE] >= 2


def test_decode_steps_log_at_debug_and_real_fallbacks_warn_once(caplog):
    model = tiny_llama(layers=1)
    model.compile(backend=sa_compile.make_backend(SparseConfig(density=1.0, min_seq_len=0, block_size=16)))
    eligibility.forget_logged()
    with caplog.at_level(logging.DEBUG, logger="sa_compile"):
        _generate(model, _ids(64), torch.ones(1, 64, dtype=torch.long))
        eligibility.count_dense(eligibility.SOFTCAP)
        eligibility.count_dense(eligibility.SOFTCAP)
    levels = {r.levelno for r in caplog.records if eligibility.DECODE in r.message}
    assert levels == {logging.DEBUG}
    softcap = [r for r in caplog.records if eligibility.SOFTCAP in r.message]
    assert [r.levelno for r in softcap] == [logging.WARNING]
    assert counters["sa_compile"][DECODE] == 2 and counters["sa_compile"][f"skipped: {eligibility.SOFTCAP}"] == 2
