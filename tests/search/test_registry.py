"""The registry of pattern kinds: a template is its file plus one entry, and every consumer sees it.

The throwaway template here is the whole recipe for adding a kind: a score function (here, the
key block's distance from the diagonal, nearest first) and one ``register`` call. The op, the
cost model, pattern tables and calibration then take it with no other change.
"""

import pytest
import torch

import sa_compile.cost_model as cost_model
from sa_compile import PatternKind, SparseConfig
from sa_compile.calibrate import Curves, compare_with_uniform, measure_layer, table_from_curves
from sa_compile.cost_model import attention_cost
from sa_compile.estimates import TEMPLATES, Template, calibration_kinds, register, search_flops, unregister
from sa_compile.patterns import ModelShape, PatternTable
from sa_compile.reference import dense_reference, masked_reference, token_mask
from sa_compile.sparse_op import select_kept_blocks, sparse_attention
from sa_compile.templates._blocks import block_offsets_QK

from ..helpers import assert_close, attention_inputs

N, D, BLOCK = 256, 16, 16
NB = N // BLOCK


def _nearest_first(q_BHND, k_BGND, config, scale, kv_valid_BN):
    """Row-normalized scores falling with the distance from the diagonal."""
    nb = -(-q_BHND.shape[-2] // config.block_size)
    offset_QK = block_offsets_QK(nb, q_BHND.device)
    scores_QK = torch.where(offset_QK >= 0, 1.0 / (1.0 + offset_QK.clamp(min=0).float()), 0.0)
    scores_QK = scores_QK / scores_QK.sum(-1, keepdim=True)
    return scores_QK.expand(*q_BHND.shape[:2], nb, nb)


@pytest.fixture
def nearest():
    entry = register(Template("nearest_first", _nearest_first, search_flops=lambda c: 7 * c.N * c.H))
    yield entry
    unregister("nearest_first")
    assert "nearest_first" not in TEMPLATES


def test_a_registered_kind_runs_in_the_op(nearest):
    cfg = SparseConfig(density=0.3, block_size=BLOCK, min_seq_len=0, pattern="nearest_first")
    q, k, v = attention_inputs(0, 1, 4, 2, N, D, torch.float32)
    keep = select_kept_blocks(q, k, cfg, D**-0.5)[0, 0]
    # Every row keeps the sink and then its nearest blocks, contiguous from the diagonal down.
    for qb in range(NB):
        kept = set(torch.nonzero(keep[qb])[:, 0].tolist())
        nearest_run = {qb - j for j in range(len(kept))} if 0 in {qb - j for j in range(len(kept))} else \
            {0} | {qb - j for j in range(len(kept) - 1)}
        assert kept == nearest_run, qb
    assert 2 < int(keep.sum()) < NB * (NB + 1) // 2
    op = torch.compile(sparse_attention, fullgraph=True)
    out, compiled_keep = op(q, k, v, cfg, return_keep=True)
    assert torch.equal(compiled_keep[0, 0], keep)
    assert_close(out, masked_reference(q, k, v, token_mask(compiled_keep, BLOCK, N)))
    full = SparseConfig(density=1.0, block_size=BLOCK, min_seq_len=0, pattern="nearest_first")
    assert_close(op(q, k, v, full), dense_reference(q, k, v))


def test_a_registered_kind_has_its_search_flops_in_the_cost_model(nearest):
    cfg = SparseConfig(block_size=BLOCK, min_seq_len=0, pattern="nearest_first")
    assert attention_cost(4096, cfg, heads=8, head_dim=D)["search_flops"] == 7 * 4096 * 8
    assert search_flops("nearest_first", cost_model) == 7 * cost_model.N * cost_model.H


def test_a_registered_kind_is_calibrated_and_held_in_tables(nearest):
    assert calibration_kinds()[-1] == "nearest_first"
    q, k, _ = attention_inputs(1, 1, 2, 2, N, D, torch.float32)
    retained, total = measure_layer(q, k, BLOCK, D**-0.5)
    assert retained.shape == (len(calibration_kinds()), 2, NB)
    # The planted curve: nearest_first keeps the most mass at every budget, so both heads take it.
    retained[-1] = total[:, None]
    curves = Curves(num_blocks=NB, retained={0: retained}, total={0: total}, kinds=calibration_kinds())
    table = table_from_curves(curves, ModelShape("t", 1, 2, 2, D), BLOCK, 0.3, N)
    assert table.kinds == (("nearest_first", "nearest_first"),)
    assert compare_with_uniform(curves, table)["table"]["retained_mean"] == pytest.approx(1.0)
    assert PatternTable.from_json(table.to_json()) == table


def test_the_default_kind_is_one_calibration_can_choose():
    assert SparseConfig().pattern.value in calibration_kinds()


def test_every_built_in_kind_is_registered_and_unknown_kinds_are_refused():
    assert {kind.value for kind in PatternKind} <= set(TEMPLATES)
    with pytest.raises(ValueError, match="pattern='no_such_kind' is invalid.*registered kind"):
        SparseConfig(pattern="no_such_kind")


@pytest.mark.parametrize("entry, message", [
    (Template("local", _nearest_first, lambda c: 0), "already registered"),
    (Template("Bad Name", _nearest_first, lambda c: 0), "identifier"),
    (Template("no_scores", search_flops=lambda c: 0), "either scores or the parts"),
    (Template("no_flops", _nearest_first), "search_flops"),
    (Template("bad_parts", parts=("local", "missing")), "missing"),
])
def test_bad_registrations_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        register(entry)
    assert entry.kind not in TEMPLATES or entry.kind == "local"
