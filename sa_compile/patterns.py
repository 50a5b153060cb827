"""Calibrated pattern tables: one pattern kind and one block budget per (layer, head), and
:func:`realized_density`, the fraction of the causal block grid a config computes (with a
table or with one uniform budget).

Written by ``python -m sa_compile.calibrate``, read through ``SparseConfig(patterns=path)``.
The JSON file (format version 1)::

    {"format": "sa_compile.patterns", "version": 1,
     "model": {"id": "...", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64},
     "block_size": 16, "target": 0.1, "reference_len": 2048, "taper": true,
     "layers": [{"kind": ["local", "vertical_slash", ...], "density": [0.06, 0.21, ...]}, ...],
     "calibration": {...}}          # how it was made; informational, not read back

Budget rule: head ``h`` computes ``density[h]`` of the causal block grid at ``reference_len``
tokens. At ``N`` tokens (``nb`` blocks) it keeps ``K = blocks_per_row(nb, density[h] * f)``
blocks per row, with ``f = min(1, nb_ref / nb)`` when ``taper`` is true (past the reference
length each query keeps the same number of blocks, as ``SparseConfig.taper_from`` does) and
``f = 1`` otherwise. Kinds: any kind in the registry (:mod:`sa_compile.estimates`); calibration
chooses among ``local``, ``vertical_slash``, ``block_sparse``, ``auto`` and ``strided_query``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch

from sa_compile.templates._blocks import num_blocks

from .estimates import TEMPLATES
from .eligibility import BLOCK_SIZES, is_int
from .selection import blocks_per_row, causal_block_count, grid_cost

FORMAT = "sa_compile.patterns"
VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """What a table must match: the attention layers and heads of one model."""

    id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class PatternTable:
    """Per-layer, per-head pattern kinds and budgets (fractions of the causal block grid at
    ``reference_len``). Example::

        table = PatternTable.load("patterns.json")
        table.kinds[3][0], table.densities[3][0]      # layer 3, head 0
        table.save("copy.json")
    """

    model: ModelShape
    block_size: int
    target: float
    reference_len: int
    taper: bool
    kinds: tuple[tuple[str, ...], ...]
    densities: tuple[tuple[float, ...], ...]
    calibration: tuple = ()  # ((key, value), ...): how the table was made, informational

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def reference_blocks(self) -> int:
        return num_blocks(self.reference_len, self.block_size)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "model": vars(self.model).copy(),
            "block_size": self.block_size, "target": self.target, "reference_len": self.reference_len,
            "taper": self.taper,
            "layers": [{"kind": list(k), "density": list(d)} for k, d in zip(self.kinds, self.densities)],
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_json(cls, data) -> PatternTable:
        """Parse and validate; every problem raises ``ValueError`` naming the field."""
        _require(isinstance(data, dict), "the table", "a JSON object")
        _require(data.get("format") == FORMAT, "format", f"{FORMAT!r}", data.get("format"))
        _require(data.get("version") == VERSION, "version", f"{VERSION} (this sa_compile reads only that)",
                 data.get("version"))
        model = data.get("model")
        _require(isinstance(model, dict), "model", "an object with id, num_layers, num_heads, num_kv_heads, head_dim")
        fields = ("id", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        missing = [f for f in fields if f not in model]
        _require(not missing, "model", f"the fields {fields}", f"missing {missing}")
        layers = data.get("layers")
        _require(isinstance(layers, list) and all(isinstance(x, dict) for x in layers), "layers",
                 "a list of {kind: [...], density: [...]} objects")
        for name in ("block_size", "target", "reference_len", "taper"):
            _require(name in data, name, "present")
        return cls(
            model=ModelShape(**{f: model[f] for f in fields}), block_size=data["block_size"],
            target=data["target"], reference_len=data["reference_len"], taper=data["taper"],
            kinds=tuple(_as_tuple(layer.get("kind"), f"layers[{i}].kind") for i, layer in enumerate(layers)),
            densities=tuple(_as_tuple(layer.get("density"), f"layers[{i}].density")
                            for i, layer in enumerate(layers)),
            calibration=tuple(sorted(data.get("calibration", {}).items())),
        )

    @classmethod
    def load(cls, path) -> PatternTable:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read pattern table {os.fspath(path)!r}: {error}") from error
        return cls.from_json(data)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ``ValueError`` unless the table was made for this attention shape."""
        have = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        wrong = {k: (getattr(self.model, k), v) for k, v in have.items() if getattr(self.model, k) != v}
        if wrong:
            detail = ", ".join(f"{k}: table {t}, model {m}" for k, (t, m) in wrong.items())
            raise ValueError(f"pattern table for {self.model.id!r} does not match the model ({detail})")

    def computed_fraction(self, seq_len: int) -> float:
        """Fraction of the causal block grid the table's heads compute at ``seq_len`` tokens,
        summed over every layer and head (exact: each head keeps ``min(K_h, qb + 1)`` blocks of
        row ``qb``, with ``K_h`` from the budget rule above)."""
        nb = num_blocks(seq_len, self.block_size)
        scale = min(1.0, self.reference_blocks / nb) if self.taper else 1.0
        densities = [d * scale for row in self.densities for d in row]
        k_all = blocks_per_row(nb, torch.tensor(densities, dtype=torch.float64), "cpu")
        return float(grid_cost(k_all, nb).sum()) / (len(densities) * causal_block_count(nb))

    def layer_fields(self, layer: int) -> dict:
        """The plain-literal graph arguments that hand one layer's row to the op."""
        return {"head_kinds": self.kinds[layer], "head_densities": self.densities[layer],
                "reference_blocks": self.reference_blocks, "taper": self.taper}


def _as_tuple(value, name: str) -> tuple:
    _require(isinstance(value, (list, tuple)), name, "a list with one entry per head")
    return tuple(value)


def _require(ok: bool, name: str, expected: str, got=None) -> None:
    if not ok:
        raise ValueError(f"pattern table: {name} is invalid: expected {expected}" +
                         ("" if got is None else f", got {got!r}"))


def _validate(table: PatternTable) -> None:
    m = table.model
    _require(isinstance(m.id, str), "model.id", "a string", m.id)
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        _require(is_int(getattr(m, name)) and getattr(m, name) >= 1, f"model.{name}", "an integer >= 1",
                 getattr(m, name))
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", f"a divisor of num_heads={m.num_heads}",
             m.num_kv_heads)
    _require(table.block_size in BLOCK_SIZES, "block_size", f"one of {BLOCK_SIZES}", table.block_size)
    _require(isinstance(table.target, (int, float)) and 0 < table.target <= 1, "target", "a number in (0, 1]",
             table.target)
    _require(is_int(table.reference_len) and table.reference_len >= table.block_size, "reference_len",
             f"an integer >= block_size={table.block_size}", table.reference_len)
    _require(isinstance(table.taper, bool), "taper", "true or false", table.taper)
    for name, rows in (("kind", table.kinds), ("density", table.densities)):
        _require(len(rows) == m.num_layers, "layers", f"model.num_layers={m.num_layers} entries "
                 f"(by {name})", len(rows))
        for i, row in enumerate(rows):
            _require(len(row) == m.num_heads, f"layers[{i}].{name}", f"model.num_heads={m.num_heads} entries",
                     len(row))
    for i, row in enumerate(table.kinds):
        for h, kind in enumerate(row):
            _require(kind in TEMPLATES, f"layers[{i}].kind[{h}]", f"a registered kind, one of {sorted(TEMPLATES)}",
                     kind)
    for i, row in enumerate(table.densities):
        for h, d in enumerate(row):
            ok = isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 1
            _require(ok, f"layers[{i}].density[{h}]", "a number in (0, 1]", d)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> PatternTable:
    return PatternTable.load(path)


def load_table(path: str) -> PatternTable:
    """:meth:`PatternTable.load`, cached until the file changes."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise ValueError(f"cannot read pattern table {path!r}: {error}") from error
    return _load_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


def realized_density(seq_len: int, config) -> float:
    """Fraction of the causal block grid the sparse path computes at ``seq_len`` tokens.

    Exact, not an estimate: every row keeps ``min(K, qb + 1)`` blocks whatever the input.
    Returns 1.0 below ``config.min_seq_len``, where attention stays dense. The budget is
    ``config.density_at(nb)`` (it tapers past ``config.taper_from``). With
    ``search_head_budgets`` the split between heads depends on the input and this is the
    uniform split's total, which the searched split never exceeds.
    With ``config.patterns`` it is the table's total over all its layers and heads
    (:meth:`PatternTable.computed_fraction`).
    """
    if seq_len < config.min_seq_len:
        return 1.0
    if config.patterns is not None:
        return load_table(config.patterns).computed_fraction(seq_len)
    nb = num_blocks(seq_len, config.block_size)
    k = int(blocks_per_row(nb, config.density_at(nb), "cpu"))
    return grid_cost(k, nb) / causal_block_count(nb)
