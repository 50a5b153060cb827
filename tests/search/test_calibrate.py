"""Calibrated pattern tables: the search finds planted structure, meets its FLOP target, beats a
uniform budget, bad tables are refused, and the backend runs a table exactly."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig
from sa_compile.calibrate import (
    Curves, allocate_head_budgets, compare_with_uniform, measure_layer, model_shape, table_from_curves,
)
from sa_compile.calibrate_cli import main
from sa_compile.estimates import calibration_kinds
from sa_compile.patterns import ModelShape, PatternTable, realized_density
from sa_compile.selection import blocks_per_row, causal_block_count, grid_cost
from sa_compile.sparse_op import select_kept_blocks, sparse_attention

from sa_compile.reference import masked_reference, token_mask

from ..helpers import assert_close, attention_inputs, tiny_llama

N, D, BLOCK = 512, 32, 16
NB = N // BLOCK
# The retrieval head's rows differ from their neighbours: the row-aware vertical-slash estimate
# keeps them as well as the pooled one does, and wins the tie as the earlier kind.
EXPECTED = ("local", "vertical_slash", "vertical_slash")


def planted_qk(seed: int = 0):
    """Three heads (scale 1): a local band; one heavy key column; a retrieval head (a band, plus a
    middle query block and the last 64 queries that look up one span of keys).

    The band is a slow rotation shared by q and k (logit ``c^2 cos(w (i - j))``, ~12 tokens wide).
    The heavy key's block-mates lean away from the shared direction so the block's mean key looks
    like any other's: only an exact (vertical) estimate sees it. The retrieval rows differ from
    their neighbours, so only a per-row estimate (row-aware vertical-slash, or pooled) keeps both
    them and the band.
    """
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(N, dtype=torch.float64)
    w = math.pi / N
    band = torch.stack([torch.cos(w * pos), torch.sin(w * pos)], -1) / (w * 12)

    def noise():
        return torch.randn(N, D, generator=g, dtype=torch.float64) * 0.3

    def with_band():
        q, k = noise(), noise()
        q[:, :2], k[:, :2] = band, band
        return q, k

    q_local, k_local = with_band()
    q_col, k_col = noise(), noise()
    u = torch.zeros(D, dtype=torch.float64)
    u[8:16] = 1.0
    q_col += u
    k_col -= 0.2 * u
    k_col[32:48] -= (3.2 + 3.0) / 15 * u - 0.2 * u
    k_col[40] = 3.0 * u
    q_ret, k_ret = with_band()
    topic = torch.zeros(D, dtype=torch.float64)
    topic[16:24] = 4.9
    q_ret[256:272] += topic
    q_ret[-64:] += topic
    k_ret[96:128] += topic
    q = torch.stack([q_local, q_col, q_ret])[None].float()
    k = torch.stack([k_local, k_col, k_ret])[None].float()
    return q, k


@pytest.fixture(scope="module")
def planted_curves():
    retained, total = measure_layer(*planted_qk(), BLOCK, scale=1.0)
    return Curves(num_blocks=NB, retained={0: retained}, total={0: total}, kinds=calibration_kinds())


def _shape(layers=1, heads=3, kv_heads=3, head_dim=D):
    return ModelShape("planted", layers, heads, kv_heads, head_dim)


@pytest.mark.parametrize("target", [0.2, 0.3])
def test_planted_heads_get_their_kind(planted_curves, target):
    table = table_from_curves(planted_curves, _shape(), BLOCK, target, N)
    assert table.kinds[0] == EXPECTED
    k_retrieval = int(blocks_per_row(NB, table.densities[0][2], "cpu"))
    kept_T = planted_curves.fractions(0)[:, 2, k_retrieval - 1]
    kinds = calibration_kinds()
    local, vertical_slash, block_sparse = (kept_T[kinds.index(k)] for k in ("local", "vertical_slash", "block_sparse"))
    assert vertical_slash >= block_sparse - 1e-6 and vertical_slash > local + 0.01  # a tie, up to rounding


@pytest.mark.parametrize("target", [0.2, 0.25, 0.3, 0.4])
def test_budgets_meet_the_flop_target_and_keep_at_least_a_uniform_budgets_mass(planted_curves, target):
    table = table_from_curves(planted_curves, _shape(), BLOCK, target, N)
    result = compare_with_uniform(planted_curves, table)
    computed = result["table"]["computed_fraction"]
    assert 0.95 * target <= computed <= target * (1 + 1e-9), computed
    assert result["table"]["retained_mean"] >= result["uniform"]["retained_mean"] - 1e-9
    assert result["table"]["retained_mean"] >= result["uniform_at_table_flops"]["retained_mean"] - 1e-9
    exact = sum(grid_cost(int(blocks_per_row(NB, d, "cpu")), NB) for d in table.densities[0])
    assert exact / (3 * causal_block_count(NB)) == pytest.approx(computed)


def test_allocation_spends_where_mass_is_bought_cheapest():
    """Head 0 is saturated from the floor; head 1 gains steadily: the budget goes to head 1."""
    nb = 16
    flat = torch.ones(nb)
    rising = torch.linspace(0.1, 1.0, nb)
    k_H = allocate_head_budgets(torch.stack([flat, rising]), 0.5)
    assert int(k_H[0]) == 2 and int(k_H[1]) > 2
    spent = sum(grid_cost(int(k), nb) for k in k_H)
    assert 0.95 * 0.5 * 2 * causal_block_count(nb) <= spent <= 0.5 * 2 * causal_block_count(nb)


def test_a_target_below_the_floor_is_refused():
    with pytest.raises(ValueError, match="below the sink \\+ diagonal floor"):
        allocate_head_budgets(torch.rand(2, 32), 0.05)


# ---- the table file ------------------------------------------------------------------------------

def _table(layers=2, heads=4, kv_heads=2, head_dim=16, density=1.0, kinds=("local", "vertical_slash",
                                                                          "block_sparse", "auto")):
    return PatternTable(model=ModelShape("tiny", layers, heads, kv_heads, head_dim), block_size=BLOCK, target=density,
                        reference_len=256, taper=True, kinds=(tuple(kinds),) * layers,
                        densities=((density,) * heads,) * layers)


def test_table_round_trips_through_json(tmp_path):
    table = replace(_table(density=0.3), calibration=(("prompts", 2),))
    table.save(tmp_path / "t.json")
    assert PatternTable.load(tmp_path / "t.json") == table


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["layers"].pop(), "layers"),
    (lambda d: d["layers"][1]["kind"].pop(), r"layers\[1\].kind"),
    (lambda d: d["layers"][0]["kind"].__setitem__(2, "diagonal"), r"layers\[0\].kind\[2\]"),
    (lambda d: d["layers"][1]["density"].__setitem__(3, 1.5), r"layers\[1\].density\[3\]"),
    (lambda d: d["layers"][1]["density"].__setitem__(0, 0), r"layers\[1\].density\[0\]"),
    (lambda d: d.update(block_size=48), "block_size"),
    (lambda d: d["model"].update(num_kv_heads=3), "num_kv_heads"),
    (lambda d: d["model"].pop("head_dim"), "model"),
    (lambda d: d.pop("taper"), "taper"),
])
def test_bad_tables_are_refused_naming_the_field(tmp_path, edit, message):
    data = _table(density=0.3).to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        PatternTable.load(path)


def test_unreadable_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read pattern table"):
        PatternTable.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read pattern table"):
        PatternTable.load(tmp_path / "broken.json")


def test_config_keeps_the_table_as_a_plain_path(tmp_path):
    config = SparseConfig(patterns=tmp_path / "t.json", block_size=BLOCK)
    assert config.patterns == str(tmp_path / "t.json")
    assert SparseConfig.from_fields(config.describe()) == config
    hash(config)
    with pytest.raises(ValueError, match="search_head_budgets"):
        SparseConfig(patterns="t.json", search_head_budgets=True)


# ---- in the graph --------------------------------------------------------------------------------

def test_per_head_kinds_and_budgets_are_exact_in_the_compiled_op():
    """One compiled graph for two lengths (dynamic shapes): at 280 tokens (18 blocks) the budgets
    taper from the table's reference of 13 blocks."""
    layer = {"head_kinds": ("block_sparse", "local", "auto", "vertical_slash"),
             "head_densities": (0.2, 0.5, 0.35, 1.0), "reference_blocks": 13, "taper": True}
    config = SparseConfig(block_size=BLOCK, min_seq_len=0, last_q=32)
    attention = torch.compile(sparse_attention, dynamic=True)
    for seq_len in (200, 280):
        q, k, v = attention_inputs(seed=3, batch=1, heads=4, kv_heads=2, seq_len=seq_len, head_dim=16,
                                   dtype=torch.float32)
        out, keep = attention(q, k, v, config, return_keep=True, head_pattern=layer)
        assert torch.equal(keep, select_kept_blocks(q, k, config, 16**-0.5, head_pattern=layer))
        nb = -(-seq_len // BLOCK)
        rows = torch.arange(nb)
        for h, density in enumerate(layer["head_densities"]):
            k_h = int(blocks_per_row(nb, density * min(1.0, 13 / nb), "cpu"))
            assert torch.equal(keep[0, h].sum(-1), torch.clamp(rows + 1, max=k_h)), f"head {h} at {seq_len}"
        local_config = replace(config, pattern=sa_compile.PatternKind.LOCAL, density=0.5 * min(1.0, 13 / nb))
        assert torch.equal(keep[0, 1], select_kept_blocks(q, k, local_config, 0.25)[0, 1])
        assert_close(out, masked_reference(q, k, v, token_mask(keep, BLOCK, seq_len)).float())
    assert counters["stats"]["unique_graphs"] == 1


def test_a_tables_computed_fraction_counts_the_blocks_the_op_keeps(tmp_path):
    """``PatternTable.computed_fraction`` (and ``realized_density`` with ``patterns``) equal the
    kept blocks, counted over every layer and head, below and past the reference length."""
    densities = ((0.2, 0.5, 0.35, 1.0), (0.1, 0.3, 0.6, 0.15))
    table = replace(_table(), densities=densities)
    table.save(tmp_path / "t.json")
    config = SparseConfig(block_size=BLOCK, min_seq_len=0, last_q=32, patterns=str(tmp_path / "t.json"))
    for seq_len in (200, 256, 440):
        q, k, _ = attention_inputs(seed=5, batch=1, heads=4, kv_heads=2, seq_len=seq_len, head_dim=16,
                                   dtype=torch.float32)
        kept = sum(int(select_kept_blocks(q, k, config, 0.25, head_pattern=table.layer_fields(i)).sum())
                   for i in range(table.model.num_layers))
        nb = -(-seq_len // BLOCK)
        expected = kept / (2 * 4 * causal_block_count(nb))
        assert table.computed_fraction(seq_len) == pytest.approx(expected, abs=1e-12), seq_len
        assert realized_density(seq_len, config) == pytest.approx(expected, abs=1e-12)


def _compile(model, config):
    return torch.compile(model, backend=sa_compile.make_backend(config), fullgraph=True)


def test_backend_with_a_full_budget_table_reproduces_dense(tmp_path):
    model = tiny_llama()
    path = tmp_path / "full.json"
    _table(density=1.0).save(path)
    ids = torch.randint(0, 128, (1, 97), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        actual = _compile(model, SparseConfig(block_size=BLOCK, min_seq_len=0, patterns=str(path)))(ids).logits
    assert counters["sa_compile"]["rewritten"] == 2 and counters["sa_compile"]["skipped"] == 0
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_backend_refuses_a_table_for_another_model(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 64))
    for table, message in ((_table(layers=3), "has 3 layers but the graph has 2"),
                           (_table(heads=8, kinds=("local",) * 8), "num_heads: table 8, model 4")):
        path = tmp_path / "other.json"
        table.save(path)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message), torch.no_grad():
            _compile(model, SparseConfig(block_size=BLOCK, min_seq_len=0, patterns=str(path)))(ids)
    with pytest.raises(ValueError, match="block_size"):
        sa_compile.make_backend(SparseConfig(block_size=32, patterns=str(path)))


def test_command_line_calibrates_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    main(["--model", "tiny", "--out", str(out), "--flop-budget", "0.2", "--prompts", "1"])
    table = PatternTable.load(out)
    table.check_model(**{f: getattr(model_shape(tiny_llama()), f)
                         for f in ("num_layers", "num_heads", "num_kv_heads", "head_dim")})
    assert table.block_size == 16 and table.reference_len == 1024 and all(k in calibration_kinds() for r in table.kinds for k in r)
    held_out = dict(table.calibration)["held_out"]["table"]["computed_fraction"]
    assert 0.95 * 0.2 <= held_out <= 0.2
    assert "wrote" in capsys.readouterr().out
