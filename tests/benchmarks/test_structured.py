"""The structured-input benchmark: its inputs hold what they claim, and its oracle is exact at full density."""

import argparse

import pytest
import torch

from sa_compile import PatternKind

from ..helpers import benchmark_script

structured = benchmark_script("structured")
common = benchmark_script("_common")
structured_inputs = benchmark_script("_structured_inputs").structured_inputs

N, HEADS, KV_HEADS, HEAD_DIM = 1024, 8, 2, 128


@pytest.fixture(scope="module", params=[0, 1])
def planted(request):
    q, k, v, plan = structured_inputs(N, HEADS, KV_HEADS, HEAD_DIM, seed=request.param)
    logits_HNN = (q.double() @ k.double().repeat_interleave(HEADS // KV_HEADS, 1).transpose(-1, -2))[0]
    logits_HNN *= HEAD_DIM**-0.5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    probs_HNN = torch.softmax(logits_HNN.masked_fill(~causal, float("-inf")), -1)
    return q, k, v, plan, logits_HNN, probs_HNN


LATE = slice(N // 4, N)  # queries that see enough keys for "uniform" to be small
UNIFORM_PER_KEY = (1.0 / (torch.arange(N)[LATE].double() + 1)).mean()


def test_inputs_are_deterministic_and_shaped(planted):
    q, k, v, plan, *_ = planted
    assert q.shape == (1, HEADS, N, HEAD_DIM) and k.shape == v.shape == (1, KV_HEADS, N, HEAD_DIM)
    q2, k2, v2, _ = structured_inputs(N, HEADS, KV_HEADS, HEAD_DIM, seed=plan.seed)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_every_head_attends_to_the_sinks_and_its_heavy_columns(planted):
    *_, plan, _, probs_HNN = planted
    sink_H = probs_HNN[:, LATE, : plan.sink_tokens].sum(-1).mean(-1)
    assert (sink_H > 5 * plan.sink_tokens * UNIFORM_PER_KEY).all(), sink_H
    group_H = torch.arange(HEADS) // (HEADS // KV_HEADS)
    heavy_H = torch.stack([probs_HNN[h, LATE][:, plan.heavy_positions_GJ[group_H[h]]].sum(-1).mean()
                           for h in range(HEADS)])
    assert (heavy_H > 2 * plan.heavy_positions_GJ.shape[1] * UNIFORM_PER_KEY).all(), heavy_H


def test_the_rope_band_lifts_nearby_keys(planted):
    *_, plan, logits_HNN, probs_HNN = planted
    rows = torch.arange(N // 2, N)

    def logit_at(distance):
        return logits_HNN[:, rows, rows - distance].mean(-1)

    far_H = torch.stack([logit_at(d) for d in range(64, 128)]).mean(0)
    assert (logit_at(0) - far_H > 0.6 * plan.lifts["band"]).all()
    assert (logit_at(0) > logit_at(4)).all() and (logit_at(4) > far_H).all()
    offsets = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    near_H = (probs_HNN * ((offsets >= 0) & (offsets < 8))).sum(-1)[:, LATE].mean(-1)
    assert (near_H > 2.5 * 8 * UNIFORM_PER_KEY).all(), near_H


def test_lookup_heads_look_up_their_span_and_the_others_do_not(planted):
    *_, plan, _, probs_HNN = planted
    for lookup in plan.lookups:
        (q0, q1), (k0, k1) = lookup["queries"], lookup["keys"]
        share_H = probs_HNN[:, q0:q1, k0:k1].sum(-1).mean(-1)
        control_H = probs_HNN[:, 2 * q0 - q1 : q0, k0:k1].sum(-1).mean(-1)  # the queries just before
        ratio_H = share_H / control_H
        assert (ratio_H[lookup["heads"]] > 2.5).all(), ratio_H
        assert (ratio_H[~lookup["heads"]] < 2.0).all(), ratio_H


@pytest.mark.parametrize("pattern", [PatternKind.AUTO, PatternKind.BLOCK_QUERY])
def test_full_density_oracle_and_op_are_exact_and_the_oracle_recalls_at_least_as_much(pattern):
    """The benchmark's own measurement path, compiled, at a tiny size."""
    args = argparse.Namespace(heads=4, kv_heads=2, head_dim=64, seed=0, dtype="float32", block_size=16,
                              chunk_gib=1e-4, densities=[1.0, 0.3], search_head_budgets=False, pattern=pattern)
    device = torch.device("cpu")
    rows, record = structured.measure_length(256, args, structured.Ops(device), device, common.Progress())
    full, sparse = rows
    for side in (full["search"], full["oracle"]):
        assert side["rel_err"] < 1e-5 and side["recall"]["min"] == pytest.approx(1.0, abs=1e-9)
    assert record["floor_rel_err"] < 1e-5
    assert sparse["realized_density"] < 1.0
    assert sparse["oracle"]["recall"]["mean"] >= sparse["search"]["recall"]["mean"] - 1e-9
    assert all(o >= s - 1e-9 for o, s in zip(sparse["oracle"]["recall_H"], sparse["search"]["recall_H"]))
    assert sparse["search"]["rel_err"] > 1e-3, "a sparse selection changed nothing"


def test_head_budget_search_is_measured_against_the_uniform_oracle_at_no_more_cost():
    args = argparse.Namespace(heads=4, kv_heads=2, head_dim=64, seed=0, dtype="float32", block_size=16,
                              chunk_gib=1e-4, densities=[0.3], search_head_budgets=True, pattern=PatternKind.AUTO)
    device = torch.device("cpu")
    (row,), _ = structured.measure_length(256, args, structured.Ops(device), device, common.Progress())
    assert 0.9 * row["oracle_realized_density"] <= row["realized_density"] <= row["oracle_realized_density"]
