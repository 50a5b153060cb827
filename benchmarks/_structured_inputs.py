"""Long structured attention inputs: q, k, v with the patterns real long-context heads show.

Planted in every input, with a strength drawn per query head (so heads differ, and the
per-head search has something to find):

- **sinks**: the first ``sink_tokens`` keys, which every query attends to;
- **heavy columns**: a few keys per KV head, scattered, that every query attends to;
- **a local band from RoPE**: q and k share a constant component in the fast-rotating
  dimensions, so after Llama's rotary embedding their logit falls with the distance
  ``q - k`` (each head keeps its own range of frequencies, hence its own band width);
- **lookups**: the last ``lookup_queries`` queries look up one span of keys, and a block of
  queries in the middle looks up another (a pattern the last queries cannot see). Only
  some heads (``lookup_head_share``) do each lookup.

Sinks, heavy columns and lookups live in the slowly rotating dimensions, where RoPE turns a
vector by less than half a radian across the whole input, so their logits barely depend on
position. Each structure's logit lift is ``ln(N / tokens it spans) + offset``: its share of
the attention mass then does not fade as the input grows. Noise (Gaussian q and k entries,
kept out of the planted directions) spreads the rest over all keys.

    q_BHND, k_BGND, v_BGND, plan = structured_inputs(32768, heads=32, kv_heads=8, head_dim=128)

RoPE is the real Llama-3.1 one (theta 500000, the ``llama3`` frequency scaling), taken from
transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Llama-3.1-8B's rotary embedding.
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_SLOW_TURN = 0.5  # radians: a pair that turns less than this over the input is "slow"
NOISE = 0.7  # std of q and k entries around the planted structure


@dataclass
class Plan:
    """What was planted where (token positions, query-head strengths), for reports and tests."""

    seq_len: int
    sink_tokens: int
    heavy_positions_GJ: torch.Tensor
    lookups: list[dict] = field(default_factory=list)  # query range, key range, head mask
    band_width_H: torch.Tensor | None = None
    lifts: dict[str, torch.Tensor] = field(default_factory=dict)  # logit lift per query head
    seed: int = 0

    def describe(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "sink_tokens": self.sink_tokens,
                "heavy_positions_GJ": self.heavy_positions_GJ.tolist(),
                "lookups": [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in lk.items()}
                            for lk in self.lookups],
                "band_width_H": self.band_width_H.tolist(),
                "lifts": {k: [round(x, 3) for x in v.tolist()] for k, v in self.lifts.items()}}


def llama_rope(seq_len: int, head_dim: int, device):
    """cos, sin ``[1, N, D]`` and the inverse frequencies of Llama-3.1's rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                         max_position_embeddings=max(seq_len, 131072), rope_parameters=dict(LLAMA31_ROPE))
    rope = LlamaRotaryEmbedding(config).to(device)
    x = torch.zeros(1, 1, head_dim, device=device)
    cos, sin = rope(x, torch.arange(seq_len, device=device)[None])
    return cos, sin, rope.inv_freq


def _pair_dims(pairs_F: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF's rotate_half pairs dimension i with i + D/2."""
    return torch.cat([pairs_F, pairs_F + head_dim // 2])


def _slow_directions(inv_freq_F, seq_len: int, head_dim: int, count: int, gen) -> torch.Tensor:
    """``count`` orthonormal directions ``[D, count]`` in the slowly rotating pairs, each in
    pairs of its own: RoPE only mixes the two dimensions of a pair, so rotated directions
    stay orthogonal (no lift leaks from one planted structure to another)."""
    slow_F = torch.nonzero(inv_freq_F.cpu() * seq_len < _SLOW_TURN).flatten()
    if len(slow_F) < count:
        raise ValueError(f"head_dim {head_dim} has {len(slow_F)} slow RoPE pairs at {seq_len} tokens; {count} needed")
    basis = torch.zeros(head_dim, count)
    for i in range(count):
        dims = _pair_dims(slow_F[i::count], head_dim)
        direction = torch.randn(len(dims), generator=gen)
        basis[dims, i] = direction / direction.norm()
    return basis


def _band_vectors(inv_freq_F, seq_len: int, width_H, kv_heads: int, gen):
    """Per KV head a vector with one unit of length per pair (random phases) outside the slow
    pairs, and per query head the mask of the pairs that turn at least one radian within
    ``width`` tokens: summed over those pairs, cos(d * theta) stays high for |d| below the width."""
    inv_freq_F = inv_freq_F.cpu().float()
    not_slow_F = inv_freq_F * seq_len >= _SLOW_TURN
    phase_GF = torch.rand(kv_heads, len(inv_freq_F), generator=gen) * 2 * math.pi
    c_GD = torch.cat([phase_GF.cos(), phase_GF.sin()], dim=-1) * not_slow_F.repeat(2)
    fast_HF = (inv_freq_F[None, :] * width_H[:, None] >= 1.0) & not_slow_F
    return c_GD, fast_HF.repeat(1, 2).float()


def _uniform(gen, low: float, high: float, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _lookup(gen, seq_len: int, heads: int, span: int, queries: tuple[int, int], key_range: tuple[float, float],
            share: float) -> dict:
    lo, hi = int(key_range[0] * seq_len), int(key_range[1] * seq_len) - span
    start = int(torch.randint(lo, max(hi, lo + 1), (1,), generator=gen))
    heads_H = torch.rand(heads, generator=gen) < share
    heads_H[int(torch.randint(heads, (1,), generator=gen))] = True  # at least one head looks
    return {"queries": queries, "keys": (start, start + span), "heads": heads_H}


def _plan(seq_len, heads, kv_heads, sink_tokens, heavy_per_head, span, lookup_queries, lookup_head_share, gen) -> Plan:
    heavy_GJ = torch.stack([torch.randperm(seq_len - sink_tokens, generator=gen)[:heavy_per_head]
                            for _ in range(kv_heads)]).sort(-1).values + sink_tokens
    last = (seq_len - lookup_queries, seq_len)
    middle = (int(0.6 * seq_len), int(0.6 * seq_len) + lookup_queries)
    lookups = [_lookup(gen, seq_len, heads, span, last, (0.05, 0.5), lookup_head_share),
               _lookup(gen, seq_len, heads, span, middle, (0.05, 0.5), lookup_head_share)]
    ln_n = math.log(seq_len)
    widest = max(5, min(11, int(math.log2(seq_len)) - 4))  # 32 .. 2048 tokens, at most N / 16
    width_H = 2.0 ** torch.randint(5, widest + 1, (heads,), generator=gen)
    lifts = {"sink": ln_n - math.log(sink_tokens) + _uniform(gen, -0.5, 3.0, heads),
             "heavy": ln_n - math.log(heavy_per_head) + _uniform(gen, -1.0, 2.0, heads),
             "band": ln_n - width_H.log() + _uniform(gen, 2.5, 5.0, heads)}
    for i, lk in enumerate(lookups):
        lifts[f"lookup{i}"] = torch.where(lk["heads"], ln_n - math.log(span) + _uniform(gen, 1.0, 3.0, heads), 0.0)
    return Plan(seq_len, sink_tokens, heavy_GJ, lookups, width_H, lifts)


def _noise(shape, basis_DU, gen, device) -> torch.Tensor:
    """Gaussian noise with the planted directions projected out (their lifts stay exact)."""
    x = torch.randn(shape, generator=gen, device=device) * NOISE
    return x - (x @ basis_DU) @ basis_DU.T


def structured_inputs(seq_len: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, *, seed: int = 0,
                      dtype=torch.float32, device="cpu", sink_tokens: int = 4, heavy_per_head: int = 8,
                      lookup_span: int = 256, lookup_queries: int = 1024, lookup_head_share: float = 0.3):
    """q ``[1, H, N, D]``, k and v ``[1, G, N, D]`` (RoPE applied to q and k) and the :class:`Plan`.

    Built in float32 on ``device`` and cast to ``dtype`` at the end. Deterministic for a
    given seed and device. Example::

        q, k, v, plan = structured_inputs(4096, heads=8, kv_heads=2, head_dim=64)
        plan.lookups[0]["keys"]   # (start, end) of the span the last queries look up
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    lookup_span, lookup_queries = min(lookup_span, seq_len // 8), min(lookup_queries, seq_len // 8)
    if lookup_span < 1 or sink_tokens + heavy_per_head >= seq_len:
        raise ValueError(f"seq_len {seq_len} is too short for the planted structure")
    gen = torch.Generator().manual_seed(seed)
    plan = _plan(seq_len, heads, kv_heads, sink_tokens, heavy_per_head, lookup_span, lookup_queries,
                 lookup_head_share, gen)
    plan.seed = seed
    cos, sin, inv_freq_F = llama_rope(seq_len, head_dim, device)
    scale = head_dim**-0.5
    basis_DU = _slow_directions(inv_freq_F, seq_len, head_dim, 2 + len(plan.lookups), gen)
    c_GD, fast_HD = _band_vectors(inv_freq_F, seq_len, plan.band_width_H, kv_heads, gen)

    # k carries each structure with length `strength`; q the matching direction scaled so that
    # q . k * scale equals the planted lift.
    strength = head_dim**0.5 * 2  # planted keys stand out in norm, as real sinks do
    # Band: q and k parts balanced, so that neither amplifies the other's noise much.
    num_fast = max(int((c_GD[0] != 0).sum()) // 2, 1)
    kappa = math.sqrt(math.log(seq_len) / (num_fast * scale))
    q_band_HD = c_GD.repeat_interleave(heads // kv_heads, 0) * fast_HD
    q_band_HD *= (plan.lifts["band"] / (kappa * scale * fast_HD.sum(-1) / 2)).nan_to_num(0.0)[:, None]
    q_HD = q_band_HD + torch.outer(plan.lifts["sink"], basis_DU[:, 0] / (strength * scale))
    q_HD += torch.outer(plan.lifts["heavy"], basis_DU[:, 1] / (strength * scale))

    gen_device = torch.Generator(device=device).manual_seed(seed)
    basis_DU, c_GD = basis_DU.to(device), c_GD.to(device)
    q_BHND = _noise((1, heads, seq_len, head_dim), basis_DU, gen_device, device) + q_HD.to(device)[None, :, None]
    k_BGND = _noise((1, kv_heads, seq_len, head_dim), basis_DU, gen_device, device) + kappa * c_GD[None, :, None]
    k_BGND[:, :, :sink_tokens] += strength * basis_DU[:, 0]
    heads_G1 = torch.arange(kv_heads, device=device)[:, None]
    k_BGND[0, heads_G1, plan.heavy_positions_GJ.to(device)] += strength * basis_DU[:, 1]
    for i, lk in enumerate(plan.lookups):
        direction_D = basis_DU[:, 2 + i]
        k_BGND[:, :, lk["keys"][0] : lk["keys"][1]] += strength * direction_D
        q_lift_H = (plan.lifts[f"lookup{i}"] / (strength * scale)).to(device)
        q_BHND[0, :, lk["queries"][0] : lk["queries"][1]] += q_lift_H[:, None, None] * direction_D
    v_BGND = torch.randn(1, kv_heads, seq_len, head_dim, generator=gen_device, device=device)
    q_BHND, k_BGND = apply_rotary_pos_emb(q_BHND, k_BGND, cos, sin)
    return q_BHND.to(dtype), k_BGND.to(dtype), v_BGND.to(dtype), plan
