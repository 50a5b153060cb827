"""benchmarks/frontier.py: fidelity and TTFT rows meet on the selection they ran."""

import json

from ..helpers import benchmark_script

frontier = benchmark_script("frontier")


def _fidelity_row(n, density, stride, kl, taper=32768, passkey=None):
    row = {"seq_len": n, "pattern": "strided_query", "density": density, "query_stride": stride, "taper_from": taper,
           "computed_fraction": density, "ppl_change": 0.01, "top1_agreement": 0.9, "kl": kl,
           "oracle": {"kl": kl / 2, "top1_agreement": 0.95}}
    if passkey:
        row["passkey"] = {"cases": [{"right": r} for r in passkey[0]]}
        row["dense_passkey"] = {"cases": [{"right": r} for r in passkey[1]]}
    return row


def test_rows_join_on_the_whole_selection_and_unmatched_ones_show_a_dash(tmp_path):
    fidelity = {"model": "m", "rows": [_fidelity_row(32768, 0.3, 8, 0.03, passkey=([True, True], [True, False])),
                                       _fidelity_row(32768, 0.3, 16, 0.04),
                                       _fidelity_row(32768, 0.3, 8, 0.02, taper=None)]}
    configs = {"sa_compile": {"pattern": "strided_query", "density": 0.3, "query_stride": 8, "taper_from": 32768},
               "sa_compile@0.3:query_stride=16": {"pattern": "strided_query", "density": 0.3, "query_stride": 16,
                                                  "taper_from": 32768}}
    ttft = {"model": "llama", "environment": {"device": "cpu"}, "sparse_configs": configs,
            "rows": [{"system": "eager", "seq_len": 32768, "ttft_s": 2.0, "speedup_vs_eager": 1.0},
                     {"system": "sa_compile", "seq_len": 32768, "ttft_s": 1.5, "speedup_vs_eager": 1.333},
                     {"system": "sa_compile@0.3:query_stride=16", "seq_len": 32768, "ttft_s": 1.4,
                      "speedup_vs_eager": 1.43},
                     {"system": "sa_compile", "seq_len": 65536, "ttft_s": 3.0, "speedup_vs_eager": 1.8}]}
    rows = {r["config"]: r for r in frontier.frontier_rows(fidelity, ttft)}
    assert rows["0.3:query_stride=8"]["speedup"] == 1.333
    assert rows["0.3:query_stride=8"]["passkeys"] == "2/1"
    assert rows["0.3:query_stride=16"]["speedup"] == 1.43
    assert rows["0.3:query_stride=8:taper_from=none"]["speedup"] is None  # not timed
    text = frontier.table(list(rows.values()))
    assert ("| 32k | 0.3:query_stride=8 | 0.300 | +1.00% | 0.900 | 0.0300 | 0.0150 | 2.00 | 2/1 "
            "| 1.33x |") in text
    (tmp_path / "f.json").write_text(json.dumps(fidelity))
    (tmp_path / "t.json").write_text(json.dumps(ttft))
    frontier.main(["--fidelity", str(tmp_path / "f.json"), "--ttft", str(tmp_path / "t.json"), "--out", str(tmp_path)])
    assert (tmp_path / "frontier.md").read_text().count("\n") == 5
