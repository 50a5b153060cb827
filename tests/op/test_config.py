import pytest
import torch

import sa_compile
from sa_compile import PatternKind, SparseConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("density", 0.0), ("density", 1.5), ("density", "0.1"), ("block_size", 100), ("block_size", 8),
        ("min_seq_len", -1), ("min_seq_len", 1.5), ("last_q", 0), ("last_q", 10_000), ("pattern", "diagonal"), ("pattern", 3),
        ("search_head_budgets", 1), ("int8_estimate", "yes"), ("int8_estimate", 1),
        ("taper_from", 64), ("taper_from", 4096.0), ("patterns", ""),
        ("patterns", 3), ("query_stride", 3), ("query_stride", 0), ("query_stride", 256),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SparseConfig.{field}="):
        SparseConfig(**{field: value})


@pytest.mark.parametrize("kind", list(PatternKind))
def test_pattern_accepts_a_kinds_value_as_users_write_it(kind):
    assert SparseConfig(pattern=kind.value).pattern is kind
    assert SparseConfig(pattern=kind.value.upper()) == SparseConfig(pattern=kind)


def test_unknown_pattern_names_the_valid_ones():
    with pytest.raises(ValueError, match="SparseConfig.pattern='diagonal'") as info:
        SparseConfig(pattern="diagonal")
    assert all(repr(kind.value) in str(info.value) for kind in PatternKind)


def test_defaults_and_description():
    cfg = SparseConfig()
    assert cfg.describe() == {
        "density": 0.3, "block_size": 128, "min_seq_len": 16384, "taper_from": 32768, "last_q": 64,
        "pattern": "strided_query", "query_stride": 8, "candidates": 4.0, "int8_estimate": True,
        "sampled_screen_means": False, "search_head_budgets": False, "patterns": None,
    }
    assert SparseConfig(pattern=PatternKind.VERTICAL_SLASH).describe()["pattern"] == "vertical_slash"
    odd = SparseConfig(density=0.3, block_size=32, min_seq_len=7, taper_from=None, last_q=9,
                       pattern=PatternKind.BLOCK_SPARSE, search_head_budgets=True)
    assert SparseConfig.from_fields(odd.describe()) == odd


def test_density_tapers_past_taper_from():
    cfg = SparseConfig(density=0.1, block_size=128, taper_from=32768)
    assert cfg.density_at(128) == 0.1 and cfg.density_at(256) == 0.1
    assert cfg.density_at(512) == pytest.approx(0.05) and cfg.density_at(1024) == pytest.approx(0.025)
    assert SparseConfig(density=0.1, taper_from=None).density_at(1024) == 0.1


def test_configs_are_values_and_replace_validates():
    """The pass keys graphs and logs by config, so equal configs hash equal; a field changed
    with dataclasses.replace is validated like a new config."""
    import dataclasses

    assert SparseConfig(pattern="strided_query") == SparseConfig() and len({SparseConfig(), SparseConfig()}) == 1
    assert SparseConfig.from_fields(SparseConfig(density=0.2).describe()) == SparseConfig(density=0.2)
    with pytest.raises(ValueError, match="density"):
        dataclasses.replace(SparseConfig(), density=2.0)


def test_make_backend_rejects_other_configs():
    with pytest.raises(ValueError, match="SparseConfig"):
        sa_compile.make_backend({"density": 0.1})


def test_backend_is_registered_with_dynamo_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("sa_compile") is sa_compile.backend
    assert "sa_compile" in torch._dynamo.list_backends()


def test_sparse_attention_refuses_to_run_eagerly():
    q = torch.randn(1, 2, 32, 16)
    with pytest.raises(RuntimeError, match="must run under torch.compile"):
        sa_compile.sparse_attention(q, q, q, SparseConfig(block_size=16, min_seq_len=0))
