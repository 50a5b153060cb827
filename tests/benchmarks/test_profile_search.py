"""The search profile: every stage timed both ways, shares of dense that add up, and the fused op's kernels."""

import json
import time

import pytest
import torch

from ..helpers import benchmark_script

profile_search = benchmark_script("profile_search")
common = benchmark_script("_common")


def test_queued_timing_is_per_call():
    calls = []
    seconds = common.time_queued(lambda: (calls.append(1), time.sleep(0.01)), torch.device("cpu"), calls=4)
    assert len(calls) == 4 and 0.01 <= seconds < 0.05


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    profile_search.main(["--device", "cpu", "--lengths", "512", "--taper-from", "256", "--repeats", "3",
                         "--warmup", "0", "--top", "30", "--warm-caches", "--beside", "int8_estimate=false",
                         "--out", str(out)])
    return json.loads((out / "profile_search.json").read_text())


def test_every_stage_is_timed_against_dense_both_ways(profile):
    """The default's stages, then the search of the config --beside changes, on the same inputs."""
    stages = [row["stage"] for row in profile["stages"]]
    assert stages[0].startswith("sdpa") and stages[1:] == [
        "estimate (all templates)", "block selection", "BlockMask build", "search + BlockMask (fused)",
        "estimate, int8_estimate=false", "search + BlockMask (fused), int8_estimate=false",
        "FlexAttention kernel", "sparse_attention (fused)"]
    dense = profile["stages"][0]
    for row in profile["stages"]:
        assert row["ms"] > 0 and row["queued_ms"] > 0
        assert row["share_of_dense"] == pytest.approx(row["ms"] / dense["ms"])
        assert row["queued_share_of_dense"] == pytest.approx(row["queued_ms"] / dense["queued_ms"])
    assert profile["config"]["candidates"] == 4.0 and profile["config"]["taper_from"] == 256
    assert profile["config"]["int8_estimate"] is True


def test_the_fused_ops_kernels_include_the_screened_search(profile):
    names = [k["name"] for k in profile["top_kernels"]]
    assert any("candidate_block_mass" in name for name in names), names
    assert all(k["seq_len"] == 512 and k["ms"] >= 0 for k in profile["top_kernels"])
