"""The one configuration object of sa_compile."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, fields

from sa_compile.templates._blocks import num_blocks

from .eligibility import BLOCK_SIZES, is_int


class PatternKind(enum.Enum):
    """How a head's block scores are estimated before the budgeted selection.

    ``VERTICAL_SLASH``: column mass (sinks, heavy tokens) plus diagonal mass (local and
    periodic structure), measured from the last ``last_q`` queries against every key; the
    heaviest columns are then re-weighted per query block by that block's mean query.
    ``BLOCK_SPARSE``: block-pooled queries against block-pooled keys, which also sees
    structure that is neither a column nor a diagonal (a retrieved span, say).
    ``BLOCK_QUERY``: each query block's mean query against every key (not a pooled key), the
    softmax summed per key block: sees short peaked spans inside a block that pooling averages
    away, at ``1 / block_size`` of dense attention's FLOPs.
    ``STRIDED_QUERY``: every ``query_stride``-th query of each block attends exactly to every
    key; its softmax, summed per key block, is the block's score. Real queries, not pooled
    ones, so it finds the blocks that hold the most true attention mass, at ``1 / (2 *
    query_stride)`` of dense attention's FLOPs (one fused kernel on CUDA).
    ``LOCAL``: no estimate; the sink and the blocks nearest the diagonal (the A shape).
    ``AUTO``: vertical-slash and block-sparse; each block keeps the stronger of the two
    row-normalized scores, so a head is served by whichever template sees its structure.
    A calibrated pattern table (``SparseConfig.patterns``) picks one kind per head instead.
    """

    VERTICAL_SLASH = "vertical_slash"
    BLOCK_SPARSE = "block_sparse"
    BLOCK_QUERY = "block_query"
    STRIDED_QUERY = "strided_query"
    LOCAL = "local"
    AUTO = "auto"


@dataclass(frozen=True)
class SparseConfig:
    """What the sparse attention path computes, and when it is used.

    Args:
        density: target fraction of the causal attention blocks computed per head (the
            FLOP budget). ``1.0`` reproduces dense attention. The sink and diagonal
            blocks are always computed, so very small budgets are raised to that floor.
        block_size: side of the square attention blocks the selection works on; also the
            FlexAttention sparse block size.
        min_seq_len: prompts shorter than this stay on dense SDPA.
        taper_from: past this many tokens each row keeps the number of blocks it keeps at
            ``taper_from`` tokens, so the computed fraction falls as ``taper_from / N``
            (``density`` 0.1 at 32K becomes 0.05 at 64K and 0.025 at 128K). Attention
            mass concentrates as prompts grow, and this keeps the kernel's cost per query
            constant. ``None`` keeps ``density`` at every length.
        last_q: how many of the last queries estimate the vertical-slash pattern.
        pattern: which template scores the blocks: a :class:`PatternKind`, its value
            (``"strided_query"``), or the name of a kind registered in :mod:`sa_compile.estimates`.
        query_stride: ``STRIDED_QUERY`` scores every ``query_stride``-th query of a block
            (a divisor of ``block_size``): smaller is closer to the true mass, and costs more.
        candidates: ``STRIDED_QUERY`` with a taper: the sampled queries attend only to the
            blocks a pooled screen ranks highest in each row (diagonal and sink always),
            ``candidates`` times the blocks a row keeps past the taper, so the search's cost
            grows as ``N`` rather than ``N^2`` (see :mod:`sa_compile.templates.screened_query`).
            The default, 4, proposes 164 candidates per row at 128-token blocks (a row
            keeps 41 past the taper); 3 (123) misses blocks the screen ranks just past its
            cutoff, which costs quality at 32K and 64K (docs/results.md). ``None`` scores
            every causal block: ``N^2 / stride`` work. Unused by the other kinds, by
            ``search_head_budgets``, by a pattern table and without a taper (``taper_from=None``).
        int8_estimate: the screened search (``candidates``) takes its sampled logits from int8
            queries and keys, each token with its own scale: an exact int32 dot over half the
            bytes of bf16 key tiles. On an H100 the search is 8.5% cheaper at 256K (1.9% of
            dense attention instead of 2.1%), 2.7% at 128K, and no faster at 32K; on real
            attention it changes a few kept blocks in a thousand and no measurable mass
            (docs/results.md). ``False`` computes them in the inputs' dtype.
        sampled_screen_means: the screened search (``candidates``) takes each query block's mean,
            which the screen scores against every key block, from the block's strided sample
            only (the ``block_size / query_stride`` queries the candidates are scored with), so
            the search reads ``1 / query_stride`` of the queries instead of all of them. On
            real attention (CPU) it kept the same mass to 1e-5 at 32K-128K; off until a GPU
            run times it and measures its quality (docs/results.md).
        search_head_budgets: share the layer's block budget between its heads by estimated
            mass per block of kernel work (a per-input search), instead of giving every
            head the same count. The layer computes no more blocks than with equal counts.
        patterns: path of a calibrated pattern table (JSON, see :mod:`sa_compile.patterns`
            and ``python -m sa_compile.calibrate``). Each head then uses the kind and budget
            the table gives it, in place of ``density``, ``taper_from`` and ``pattern``; the
            input still picks which blocks. Kept as a path so the config stays plain literals.

    Example::

        cfg = SparseConfig(density=0.05, min_seq_len=16384)
        model = torch.compile(model, backend=sa_compile.make_backend(cfg))
    """

    density: float = 0.3
    block_size: int = 128
    min_seq_len: int = 16384
    taper_from: int | None = 32768
    last_q: int = 64
    pattern: PatternKind | str = PatternKind.STRIDED_QUERY
    query_stride: int = 8
    candidates: float | None = 4.0
    int8_estimate: bool = True
    sampled_screen_means: bool = False
    search_head_budgets: bool = False
    patterns: str | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0,
               "density", self.density, "a number in (0, 1]")
        _check(self.block_size in BLOCK_SIZES,
               "block_size", self.block_size, f"one of {BLOCK_SIZES}")
        _check(is_int(self.min_seq_len) and self.min_seq_len >= 0,
               "min_seq_len", self.min_seq_len, "an integer >= 0")
        _check(self.taper_from is None or (is_int(self.taper_from) and self.taper_from >= self.block_size),
               "taper_from", self.taper_from, "None or an integer >= block_size")
        _check(is_int(self.last_q) and 1 <= self.last_q <= 4096,
               "last_q", self.last_q, "an integer in [1, 4096]")
        # No f-string of the fields here: configs are also built while Dynamo traces
        # (dataclasses.replace), where an int field can be symbolic and would break the graph.
        _check(is_int(self.query_stride) and 1 <= self.query_stride <= self.block_size
               and self.block_size % self.query_stride == 0,
               "query_stride", self.query_stride, "a divisor of block_size")
        _check(self.candidates is None or (isinstance(self.candidates, (int, float)) and not isinstance(
               self.candidates, bool) and 1.0 <= self.candidates <= 64.0),
               "candidates", self.candidates, "None or a number in [1, 64]")
        _check(isinstance(self.int8_estimate, bool),
               "int8_estimate", self.int8_estimate, "True or False")
        _check(isinstance(self.sampled_screen_means, bool),
               "sampled_screen_means", self.sampled_screen_means, "True or False")
        _check(isinstance(self.search_head_budgets, bool),
               "search_head_budgets", self.search_head_budgets, "True or False")
        if isinstance(self.patterns, os.PathLike):
            object.__setattr__(self, "patterns", os.fspath(self.patterns))
        _check(self.patterns is None or (isinstance(self.patterns, str) and self.patterns != ""),
               "patterns", self.patterns, "None or the path of a pattern table")
        _check(not (self.patterns and self.search_head_budgets),
               "search_head_budgets", self.search_head_budgets,
               "False when patterns is set (the table already gives each head its budget)")
        object.__setattr__(self, "pattern", _pattern_kind(self.pattern))
        # Computed here, where every field is a plain number: the width is a shape, and a
        # config traced by Dynamo (an input of a function compiled with dynamic=True) has
        # symbolic fields that plain arithmetic cannot take.
        object.__setattr__(self, "_candidate_width", _candidate_width(self))

    def density_at(self, num_blocks_) -> float:
        """The fraction of the causal block grid budgeted at ``num_blocks_`` blocks per side."""
        if self.taper_from is None:
            return self.density
        return self.density * min(1.0, (self.taper_from / self.block_size) / num_blocks_)

    def candidate_width(self) -> int | None:
        """Candidate slots per row of the screened search (a constant of the config, so one
        graph serves every length), or ``None`` when every causal block is scored."""
        return self._candidate_width

    def describe(self) -> dict:
        """A JSON-ready view, for benchmark records, logs and graph arguments."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, described: dict) -> SparseConfig:
        """Inverse of :meth:`describe`."""
        return cls(**described)


def _pattern_kind(pattern):
    """``pattern`` as a :class:`PatternKind` where it names a built-in kind, else the name of a
    kind registered in :mod:`sa_compile.estimates`; ``ValueError`` for anything else."""
    if isinstance(pattern, PatternKind):
        return pattern
    if isinstance(pattern, str):  # as users write it: pattern="block_query"
        builtin = {k.value: k for k in PatternKind}.get(pattern.lower())
        if builtin is not None:
            return builtin
        from .estimates import TEMPLATES  # a registered kind that is not built in

        if pattern in TEMPLATES:
            return pattern
    from .estimates import TEMPLATES

    _check(False, "pattern", pattern, f"a PatternKind or a registered kind, one of {sorted(TEMPLATES)}")


def _candidate_width(config: SparseConfig) -> int | None:
    if (config.candidates is None or config.taper_from is None or config.pattern is not PatternKind.STRIDED_QUERY
            or config.search_head_budgets or config.patterns):
        return None
    # The most blocks a row keeps at any length: at the taper (below it rows keep fewer, past
    # it the same or one or two fewer). Plain arithmetic, the same as selection.blocks_per_row.
    nb = num_blocks(config.taper_from, config.block_size)
    budget = config.density * nb * (nb + 1) / 2
    kept = math.floor((2 * nb + 1 - math.sqrt(max(0.0, (2 * nb + 1) ** 2 - 8 * budget))) / 2 + 1e-9)
    kept = min(max(kept, min(nb, 2)), nb)
    return max(2, math.ceil(config.candidates * kept))


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SparseConfig.{name}={value!r} is invalid: expected {allowed}")
