"""Screened strided-query template: a pooled screen proposes blocks, the strided sample ranks them.

The strided-query template attends every sampled query to every key it sees: ``N^2 / stride``
work, a constant share of dense attention at every length. Past the taper a row keeps a
constant number of blocks ``K``, so at long prompts almost all of that work scores blocks
that are never kept. Here the sampled queries attend only to ``W`` candidate blocks per
(key head, query block), about ``candidates * K`` of them: ``N * W * block / stride`` work,
linear in ``N`` at a fixed ``W``.

The screen that proposes them sees every block, at ``(N / block)^2`` cost per head: each
query block's mean query against each key block's mean key (where most mass lies on
average) and against an upper bound of its keys' logits (``relu(q) . max(k) + min(q, 0) .
min(k)``, per dimension: a block holding one key that matches the query ranks high even
when its mean does not). Each gives a causal softmax over key blocks; their sum, added over
the query heads of a key head, is the screen. The diagonal block and the sink always come
first. On CUDA the screen is one fused kernel (:mod:`._screen_triton`, TF32 dots) that writes
only each row's ranking keys; a top-k takes the candidates. The sampled queries' softmax is
then taken over the candidates' keys only, so a candidate's score is its share of the mass
the candidates hold. By default those logits multiply int8 queries and keys, each token with
its own scale (:func:`~._blocks.quantize_int8`): half the bytes of bf16 key tiles. On an H100
that makes the search 8.5% cheaper at 256K and no faster at 32K; on real attention it changes
a few kept blocks in a thousand and no measurable mass (docs/results.md).

Run ``python -m sa_compile.templates.screened_query`` to draw the candidates and the scores
on a planted input.
"""

from __future__ import annotations

import torch

from ._blocks import block_means, block_offsets_QK, dequantize_int8, num_blocks, pad_to_blocks, quantize_int8
from ._fallback import kernel_or_reference
from .strided_query import launch_key, sample_positions

_CHUNK_BYTES = 1 << 28  # float32 logits per chunk of the torch path
NO_BLOCK = -1  # a candidate slot with no block (rows with fewer causal blocks than slots)


def key_block_stats(k_BGND: torch.Tensor, block_size: int, kv_valid_BN=None):
    """Per key block, over its valid keys: the mean, the per-dimension max and min, each
    ``[B, G, nb, D]`` float32. A block with no valid key gets max ``-1e4`` and min ``1e4``
    (its bound is hugely negative, so it never screens in)."""
    B, G, N, D = k_BGND.shape
    nb = num_blocks(N, block_size)
    valid_BN = torch.ones(B, N, device=k_BGND.device, dtype=torch.bool) if kv_valid_BN is None else kv_valid_BN != 0
    valid_B1KT1 = pad_to_blocks(valid_BN, block_size).view(B, 1, nb, block_size, 1)
    k_BGKTD = pad_to_blocks(k_BGND.float(), block_size, dim=-2).unflatten(-2, (nb, block_size))
    count_B1K1 = valid_B1KT1.sum(-2).clamp(min=1)
    mean_BGKD = torch.where(valid_B1KT1, k_BGKTD, 0.0).sum(-2) / count_B1K1
    max_BGKD = torch.where(valid_B1KT1, k_BGKTD, -1e4).amax(-2)
    min_BGKD = torch.where(valid_B1KT1, k_BGKTD, 1e4).amin(-2)
    return mean_BGKD, max_BGKD, min_BGKD


def key_stats_reference(k_BGND: torch.Tensor, kv_valid_BN, block_size: int, int8: bool):
    """:func:`key_block_stats`, then with ``int8`` the keys rounded to int8 with one scale per key
    (:func:`~._blocks.quantize_int8`); without it the last two are empty. ``(mean, max, min, k8,
    k_scale)``."""
    stats = key_block_stats(k_BGND, block_size, kv_valid_BN)
    if int8:
        return (*stats, *quantize_int8(k_BGND))
    return (*stats, k_BGND.new_empty(0, dtype=torch.int8), k_BGND.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("sa_compile::key_stats", mutates_args=())
def key_stats(k_BGND: torch.Tensor, kv_valid_BN: torch.Tensor | None, block_size: int,
              int8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the screened search needs of the keys: each key block's mean, max and min over its
    valid keys (``[B, G, nb, D]`` float32, the screen's) and, with ``int8``, the keys as int8
    with one float32 scale per key (the candidate kernel's; empty without ``int8``). On CUDA
    (power-of-two blocks, head dims up to 128) one kernel reads the keys once for all five;
    elsewhere :func:`key_stats_reference`."""

    def reference():
        return key_stats_reference(k_BGND, kv_valid_BN, block_size, int8)

    if not k_BGND.is_cuda:
        return reference()
    from ._screen_triton import key_stats_cuda

    D = k_BGND.shape[-1]
    kernel = ("head dim above 128" if D > 128 else
              f"block size {block_size}, not a power of two" if block_size & (block_size - 1) else
              lambda: key_stats_cuda(k_BGND, kv_valid_BN, block_size, int8))
    return kernel_or_reference("key_stats", (f"head dim {D}", f"block size {block_size}"), kernel, reference)


@key_stats.register_fake
def _(k_BGND, kv_valid_BN, block_size, int8):
    B, G, N, D = k_BGND.shape
    nb = (N + block_size - 1) // block_size
    stats = [k_BGND.new_empty(B, G, nb, D, dtype=torch.float32) for _ in range(3)]
    if int8:
        return (*stats, k_BGND.new_empty(B, G, N, D, dtype=torch.int8), k_BGND.new_empty(B, G, N, dtype=torch.float32))
    return (*stats, k_BGND.new_empty(0, dtype=torch.int8), k_BGND.new_empty(0, dtype=torch.float32))


def screen_queries(q_BHND: torch.Tensor, G: int, block_size: int, scale: float,
                   stride: int | None = None) -> torch.Tensor:
    """The query blocks' scaled means, ``[B, G, heads_per_group * nb, D]`` float32, rows ordered
    (head, block). With ``stride`` each block's mean is over its strided sample only (the
    queries the candidate kernel scores, :func:`~.strided_query.sample_positions`): it reads
    ``1 / stride`` of the queries. A short last block's samples past the prompt's end stand for
    its last query."""
    B, H, N, D = q_BHND.shape
    nb = num_blocks(N, block_size)
    if stride is None:
        means_BHKD = block_means(q_BHND, block_size)
    else:
        pos_KR = sample_positions(nb, block_size, stride, q_BHND.device).clamp(max=N - 1)
        means_BHKD = q_BHND[:, :, pos_KR.flatten()].float().unflatten(-2, pos_KR.shape).mean(-2)
    return means_BHKD.reshape(B, G, (H // G) * nb, D) * scale


def _screen_from_stats(q_BGXD, mean_BGKD, max_BGKD, min_BGKD) -> torch.Tensor:
    B, G, X, D = q_BGXD.shape
    nb = mean_BGKD.shape[2]
    mean_logits = q_BGXD @ mean_BGKD.transpose(-1, -2)
    bound_logits = q_BGXD.clamp(min=0) @ max_BGKD.transpose(-1, -2) + q_BGXD.clamp(max=0) @ min_BGKD.transpose(-1, -2)
    causal_QK = block_offsets_QK(nb, q_BGXD.device) >= 0
    screen_BGQK = 0
    for logits in (mean_logits, bound_logits):
        logits_BGHQK = logits.view(B, G, X // nb, nb, nb).masked_fill(~causal_QK, float("-inf"))
        screen_BGQK = screen_BGQK + torch.softmax(logits_BGHQK, dim=-1).sum(2)
    return screen_BGQK


def screen_scores(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, scale: float,
                  kv_valid_BN=None) -> torch.Tensor:
    """The screen ``[B, G, nb, nb]`` float32: per key head, the sum over its query heads of
    two causal softmaxes of each query block's mean query, against the key blocks' mean
    keys and against their keys' logit bound."""
    G = k_BGND.shape[1]
    stats = key_block_stats(k_BGND, block_size, kv_valid_BN)
    return _screen_from_stats(screen_queries(q_BHND, G, block_size, scale), *stats)


def ranking_keys(screen_BGQK: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's ranking keys, ``[B, G, nb, nb + width]`` float32: the diagonal ``inf``, the
    sink ``3e38`` (rows past the first), the causal blocks their screen score (NaN as 0),
    ``-inf`` above the diagonal and in ``width`` padding columns (so one top-k of ``width``
    serves every length)."""
    nb = screen_BGQK.shape[-1]
    offset_QK = block_offsets_QK(nb, screen_BGQK.device)
    keys = screen_BGQK.float().nan_to_num(0.0, 1.0, 0.0).clamp(0.0, 1e30)
    keys = torch.where(offset_QK == 0, float("inf"), keys)
    keys = torch.where((offset_QK > 0) & (torch.arange(nb, device=keys.device) == 0), 3e38, keys)
    keys = keys.masked_fill(offset_QK < 0, float("-inf"))
    return torch.nn.functional.pad(keys, (0, width), value=float("-inf"))


def top_candidates(keys_BGQC: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` highest-keyed blocks of each row, ``[B, G, nb, width]`` int64, in key order;
    ``-inf`` keys (no causal block left) become :data:`NO_BLOCK`."""
    top_keys, top_BGQW = torch.topk(keys_BGQC, width, dim=-1, sorted=True)
    return torch.where(top_keys > float("-inf"), top_BGQW, NO_BLOCK)


def candidate_blocks(screen_BGQK: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` candidate key blocks of each row, ``[B, G, nb, width]`` int64: the diagonal
    in slot 0, the sink in slot 1 (rows past the first), then by screen score; slots past a
    row's causal blocks hold :data:`NO_BLOCK`. ``width`` may exceed ``nb``."""
    return top_candidates(ranking_keys(screen_BGQK, width), width)


def screen_ranking_keys_reference(q_BGXD, mean_BGKD, max_BGKD, min_BGKD, width: int) -> torch.Tensor:
    """The screen's ranking keys (:func:`ranking_keys`) from the scaled query-block means
    (:func:`screen_queries`) and the key-block statistics (:func:`key_block_stats`)."""
    return ranking_keys(_screen_from_stats(q_BGXD, mean_BGKD, max_BGKD, min_BGKD), width)


@torch.library.custom_op("sa_compile::screen_ranking_keys", mutates_args=())
def screen_ranking_keys(q_BGXD: torch.Tensor, mean_BGKD: torch.Tensor, max_BGKD: torch.Tensor,
                        min_BGKD: torch.Tensor, width: int) -> torch.Tensor:
    """The screen's ranking keys, ``[B, G, nb, nb + width]`` float32 (CUDA, head dims up to 128:
    one fused kernel, TF32 dots, where its launch fits the device (:mod:`._fallback`); elsewhere
    the torch reference)."""

    def reference():
        return screen_ranking_keys_reference(q_BGXD.float(), mean_BGKD.float(), max_BGKD.float(),
                                             min_BGKD.float(), width)

    if not q_BGXD.is_cuda:
        return reference()
    from ._screen_triton import screen_ranking_keys_cuda

    D, heads_per_group = q_BGXD.shape[-1], q_BGXD.shape[2] // mean_BGKD.shape[2]
    kernel = ("head dim above 128" if D > 128 else  # wider rows outgrow its shared memory
              lambda: screen_ranking_keys_cuda(q_BGXD, mean_BGKD, max_BGKD, min_BGKD, width))
    return kernel_or_reference("screen_ranking_keys", (f"head dim {D}", f"{heads_per_group} heads per group"),
                               kernel, reference)


@screen_ranking_keys.register_fake
def _(q_BGXD, mean_BGKD, max_BGKD, min_BGKD, width):
    B, G, _, _ = q_BGXD.shape
    nb = mean_BGKD.shape[2]
    return q_BGXD.new_empty(B, G, nb, nb + width, dtype=torch.float32)


def _chunk_mass(q_BHND, k_BGND, k_scale_BGN, kv_valid_BN, cand_BGQW, blocks: range, block_size: int, stride: int,
                scale: float) -> torch.Tensor:
    """Candidate mass ``[B, H, C, W]`` of query blocks ``blocks``: their samples' softmax over the
    candidates' keys, summed per candidate block over the block's samples. With ``k_scale_BGN``
    the keys are int8 (:func:`~._blocks.quantize_int8`) and each sampled query is rounded to
    int8 the same way before its logits are taken."""
    B, H, N, D = q_BHND.shape
    G, W = k_BGND.shape[1], cand_BGQW.shape[-1]
    pos_CR = sample_positions(blocks.stop, block_size, stride, q_BHND.device)[blocks.start:]
    C, R = pos_CR.shape
    cand_BGCW = cand_BGQW[:, :, blocks.start:blocks.stop]
    keys_BGCWT = cand_BGCW.clamp(min=0)[..., None] * block_size + torch.arange(block_size, device=q_BHND.device)
    visible = (keys_BGCWT < N) & (cand_BGCW >= 0)[..., None]
    keys_BGCWT = keys_BGCWT.clamp(max=N - 1)
    # Gathered first, then widened: only the chunk's candidate keys, not every key per chunk.
    index_BGX1 = keys_BGCWT.reshape(B, G, -1, 1)
    k_BGXD = k_BGND.gather(2, index_BGX1.expand(-1, -1, -1, D))
    k_BGXD = k_BGXD.float() if k_scale_BGN is None else dequantize_int8(k_BGXD, k_scale_BGN.gather(2, index_BGX1[..., 0]))
    k_BGCXD = k_BGXD.view(B, G, C, W * block_size, D)
    q_BHXD = q_BHND[:, :, pos_CR.clamp(max=N - 1).flatten()].float() * scale
    if k_scale_BGN is not None:
        q_BHXD = dequantize_int8(*quantize_int8(q_BHXD))
    q_BGCYD = q_BHXD.view(B, G, H // G, C, R, D)
    q_BGCYD = q_BGCYD.permute(0, 1, 3, 2, 4, 5).reshape(B, G, C, (H // G) * R, D)
    logits_BGCYX = q_BGCYD @ k_BGCXD.transpose(-1, -2)
    visible_BGC1X = visible.view(B, G, C, 1, W * block_size)
    pos_C1 = pos_CR.repeat(1, H // G)  # rows ordered (head, sample)
    visible_BGCYX = visible_BGC1X & (keys_BGCWT.view(B, G, C, 1, -1) <= pos_C1[None, None, :, :, None])
    if kv_valid_BN is not None:
        valid_BX = (kv_valid_BN != 0).gather(1, keys_BGCWT.reshape(B, -1)).view(B, G, C, 1, -1)
        visible_BGCYX = visible_BGCYX & valid_BX
    probs = torch.softmax(logits_BGCYX.masked_fill(~visible_BGCYX, float("-inf")), dim=-1).nan_to_num(0.0)
    sampled_C1 = (pos_C1 < N)[None, None, :, :, None]
    per_block = (probs * sampled_C1).view(B, G, C, H // G, R, W, block_size).sum((-1, -3))  # [B, G, C, HG, W]
    return per_block.permute(0, 1, 3, 2, 4).reshape(B, H, C, W)


def candidate_block_mass_reference(q_BHND, k_BGND, k_scale_BGN, kv_valid_BN, cand_BGQW, block_size: int,
                                   stride: int, scale: float, chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """The sampled queries' causal attention mass over each row's candidate blocks,
    ``[B, H, nb, W]`` float32, one chunk of query blocks at a time. ``k_scale_BGN`` None: the
    logits of the inputs as they are; else ``k_BGND`` is int8 with these per-key scales and
    the sampled queries are rounded to int8 per query (the int8 estimate)."""
    B, H, N, _ = q_BHND.shape
    nb, W = cand_BGQW.shape[-2:]
    mass_BHQW = q_BHND.new_zeros(B, H, nb, W, dtype=torch.float32)
    # Slots past a row's causal blocks hold no block: with fewer blocks than slots (short
    # prompts, small blocks) only the first nb slots can hold one, and the rest stay 0.
    live = min(W, nb)
    cand_BGQW = cand_BGQW[..., :live]
    per_block = B * H * (block_size // stride) * live * block_size * 4
    step = max(1, chunk_bytes // per_block)
    for start in range(0, nb, step):
        blocks = range(start, min(start + step, nb))
        mass_BHQW[:, :, blocks.start:blocks.stop, :live] = _chunk_mass(q_BHND, k_BGND, k_scale_BGN, kv_valid_BN,
                                                                      cand_BGQW, blocks, block_size, stride, scale)
    return mass_BHQW


@torch.library.custom_op("sa_compile::candidate_block_mass", mutates_args=())
def candidate_block_mass(q_BHND: torch.Tensor, k_BGND: torch.Tensor, k_scale_BGN: torch.Tensor | None,
                         kv_valid_BN: torch.Tensor | None, cand_BGQW: torch.Tensor, block_size: int, stride: int,
                         scale: float) -> torch.Tensor:
    """Mass of the sampled queries over their row's candidates, ``[B, H_q, nb, W]`` float32;
    with ``k_scale_BGN``, int8 keys and queries (:func:`candidate_block_mass_reference`)."""
    args = (q_BHND, k_BGND, k_scale_BGN, kv_valid_BN, cand_BGQW, block_size, stride, scale)
    if not q_BHND.is_cuda:
        return candidate_block_mass_reference(*args)
    from ._screened_triton import candidate_block_mass_cuda

    key = (*launch_key(q_BHND, k_BGND, block_size, stride), f"{k_BGND.dtype} keys")
    return kernel_or_reference("candidate_block_mass", key,
                               lambda: candidate_block_mass_cuda(*args), lambda: candidate_block_mass_reference(*args))


@candidate_block_mass.register_fake
def _(q_BHND, k_BGND, k_scale_BGN, kv_valid_BN, cand_BGQW, block_size, stride, scale):
    B, H = q_BHND.shape[:2]
    return q_BHND.new_empty(B, H, *cand_BGQW.shape[-2:], dtype=torch.float32)


def screened_query_lists(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, stride: int, scale: float,
                         width: int, kv_valid_BN=None, int8_estimate: bool = True,
                         sampled_screen_means: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates and their scores: ``(scores_BHQW, blocks_BHQW)``, slot 0 the
    diagonal, slot 1 the sink; a score is the candidate's share of the candidates' sampled
    mass (0 for :data:`NO_BLOCK` slots), from int8 queries and keys with ``int8_estimate``.
    With ``sampled_screen_means`` the screen's query-block means come from the strided sample
    only (:func:`screen_queries`)."""
    H, G = q_BHND.shape[1], k_BGND.shape[1]
    *stats, k8_BGND, k8_scale_BGN = key_stats(k_BGND, kv_valid_BN, block_size, int8_estimate)
    q_BGXD = screen_queries(q_BHND, G, block_size, scale, stride if sampled_screen_means else None)
    keys_BGQC = screen_ranking_keys(q_BGXD, *stats, width)
    cand_BGQW = top_candidates(keys_BGQC, width)
    k_BGND, k_scale_BGN = (k8_BGND, k8_scale_BGN) if int8_estimate else (k_BGND, None)
    mass_BHQW = candidate_block_mass(q_BHND, k_BGND, k_scale_BGN, kv_valid_BN, cand_BGQW, block_size, stride,
                                     float(scale))
    mass_BHQW = mass_BHQW.nan_to_num(0.0)
    scores_BHQW = mass_BHQW / mass_BHQW.sum(-1, keepdim=True).clamp(min=1e-30)
    return scores_BHQW, cand_BGQW.repeat_interleave(H // G, 1)


def _demo() -> None:
    from ._blocks import draw, planted_retrieval

    D, bs = 32, 32
    q, k = planted_retrieval(slice(150, 154), 2.0)
    scores_W, blocks_W = screened_query_lists(q, k, bs, 8, D**-0.5, width=6)
    nb = blocks_W.shape[-2]
    grid = torch.zeros(nb, nb + 1).scatter_(-1, blocks_W[0, 0].clamp(min=0) + (blocks_W[0, 0] < 0) * nb,
                                            scores_W[0, 0])[:, :nb]
    print(f"screened strided-query scores (6 candidates per row, stride 8), N=512, block={bs} "
          "(queries from 384 retrieve keys 150-153; blank = not a candidate):")
    print(draw(grid))


if __name__ == "__main__":
    _demo()
