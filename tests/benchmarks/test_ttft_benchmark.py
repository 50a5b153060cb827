"""The TTFT benchmark: its generate() systems, its tiny default, and its results without matplotlib."""

import json
import sys

import pytest
import torch

from sa_compile.patterns import realized_density

from ..helpers import benchmark_script

compile_ttft = benchmark_script("compile_ttft")
common = benchmark_script("_common")
make_systems = benchmark_script("_systems").make_systems


def test_generate_systems_run_leave_the_model_as_found_and_write_results_without_matplotlib(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    # Order matters: a system that left the model compiled or on sa_compile attention would
    # show up in the rows after it. A min_seq_len past the prompt keeps every compile dense.
    compile_ttft.main(["--systems", "generate,hf_attention,eager_generate,eager", "--lengths", "64",
                       "--min-seq-len", "4096", "--repeats", "3", "--warmup", "0", "--warm-caches",
                       "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "| hf_attention | 64 |" in out and "| generate | 64 |" in out
    assert "matplotlib is not installed" in err and "pip install" in err
    assert not (tmp_path / "ttft_tiny.png").exists()
    rows = {row["system"]: row for row in json.loads((tmp_path / "ttft_tiny.json").read_text())["rows"]}
    assert rows["generate"]["new_graphs"] >= 1 and rows["generate"]["sdpa_rewritten"].startswith("0/")
    # The attention implementation counts every call; the label is per prefill.
    assert rows["hf_attention"]["sdpa_rewritten"].startswith("0/") and rows["hf_attention"]["new_graphs"] == 0
    assert rows["hf_attention"]["sa_compile_counters"]["skipped: prompt shorter than min_seq_len"] == 2 * 4
    for later in ("eager_generate", "eager"):
        assert rows[later]["new_graphs"] == 0 and rows[later]["sa_compile_counters"] is None
    for row in rows.values():  # dense everywhere: the first token's logits agree
        assert isinstance(row["ttft_s"], float) and row["max_abs_logit_diff_vs_eager"] < 1e-4


def test_plot_panels_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert common.plot_panels(tmp_path / "p.png", [], "title") is False
    assert "pip install matplotlib" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_the_tiny_default_compares_budgets_that_compute_different_fractions():
    args = compile_ttft.parse_args([])
    base = compile_ttft.sparse_base_config(args)
    systems = [s for s in make_systems(args, base) if s.name.startswith("sa_compile")]
    assert [s.name for s in systems] == ["sa_compile", "sa_compile@0.5"]
    for n in args.lengths:
        default, extra = (realized_density(n, s.sparse) for s in systems)
        assert extra - default > 0.15, (n, default, extra)  # not both at the sink + diagonal floor


def test_speedups_compare_each_system_with_eager_and_inductor_at_its_own_length():
    rows = [{"system": s, "seq_len": n, "ttft_s": t, "logits": torch.full((1, 3), logit)}
            for s, n, t, logit in (("eager", 512, 0.08, 0.0), ("eager", 1024, 0.3, 1.0), ("inductor", 512, 0.04, 0.0),
                                   ("sa_compile", 512, 0.02, 0.25), ("sa_compile", 1024, 0.1, 1.5),
                                   ("sa_compile", 2048, "failed: OOM", 0.0))]
    compile_ttft.add_comparisons(rows)
    at_512, at_1k, failed = rows[3:]
    assert (at_512["speedup_vs_eager"], at_512["speedup_vs_inductor"]) == (4.0, 2.0)
    assert at_1k["speedup_vs_eager"] == pytest.approx(3.0) and at_1k["speedup_vs_inductor"] is None  # no inductor at 1K
    assert (at_512["max_abs_logit_diff_vs_eager"], at_1k["max_abs_logit_diff_vs_eager"]) == (0.25, 0.5)
    assert failed["speedup_vs_eager"] is None and failed["max_abs_logit_diff_vs_eager"] is None
    assert not any("logits" in r for r in rows)


def test_sparse_system_specs_set_the_density_and_named_fields():
    import sa_compile

    _systems = benchmark_script("_systems")
    system = _systems._system("sa_compile@0.20:taper_from=none:query_stride=8", None, sa_compile.SparseConfig())
    assert system.name == "sa_compile@0.2:query_stride=8:taper_from=none"
    assert (system.sparse.density, system.sparse.query_stride, system.sparse.taper_from) == (0.2, 8, None)
    with pytest.raises(SystemExit, match="bad override 'stride=8'"):
        _systems._system("sa_compile@0.2:stride=8", None, sa_compile.SparseConfig())


def test_eager_past_its_last_length_is_extrapolated_through_a_linear_plus_quadratic_fit():
    """`--eager-up-to`: eager's time at a length it did not run comes from t = a*N + b*N^2
    through its two longest lengths, and each sparse row's speedup is against that."""
    a, b = 2.8e-5, 4.4e-10  # seconds per token, per token^2: the H200's eager, roughly
    rows = [{"system": "eager", "seq_len": n, "ttft_s": a * n + b * n * n} for n in (16384, 65536, 131072)]
    rows.append({"system": "sa_compile", "seq_len": 524288, "ttft_s": 20.0})
    rows.append({"system": "sa_compile", "seq_len": 262144, "ttft_s": "OOM"})
    fit = compile_ttft.extrapolate_eager(rows, [262144, 524288])
    assert "64k and 128k" in fit["fit"]
    expected = a * 524288 + b * 524288**2
    assert abs(fit["ttft_s"]["512k"] - expected) < 1e-9 * expected
    assert abs(fit["speedup_vs_extrapolated_eager"]["sa_compile@512k"] - expected / 20.0) < 1e-9
    assert "sa_compile@256k" not in fit["speedup_vs_extrapolated_eager"]  # no time, no speedup
    assert compile_ttft.extrapolate_eager(rows[:1] + rows[3:], [524288]) is None  # one eager length: no fit
