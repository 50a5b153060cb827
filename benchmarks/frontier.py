"""Quality against TTFT: one table and one plot from a fidelity run and a TTFT run.

A fidelity row (``fidelity.py``: a real model's answers, dense against sparse, with the
oracle at the same computed fraction) and a TTFT row (``compile_ttft.py``: the Llama-3.1-8B
shape, eager in the same process) meet when they ran the same selection: the same pattern,
density, query stride and taper. Each length gets its rows, the cheapest first; a selection
measured on one side only shows "-" on the other.

    python benchmarks/frontier.py --fidelity fidelity.json --ttft ttft.json --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as common

from sa_compile import SparseConfig

_KEY_FIELDS = ("pattern", "density", "query_stride", "taper_from")


def selection_key(fields: dict) -> tuple:
    return tuple(fields[f] for f in _KEY_FIELDS)


def ttft_by_selection(record: dict) -> dict:
    """``{(selection key, seq_len): TTFT row}`` for the sparse systems of a ``compile_ttft.py`` record."""
    configs = record["sparse_configs"]
    return {(selection_key(configs[row["system"]]), row["seq_len"]): row
            for row in record["rows"] if row["system"] in configs and row.get("ttft_s")}


def selection_label(row: dict) -> str:
    """The selection spelled in full (its stride always, its taper where not the default),
    whatever the run's defaults were."""
    overrides = {"query_stride": row["query_stride"]}
    if row["taper_from"] != SparseConfig.taper_from:
        overrides["taper_from"] = row["taper_from"]
    if row["pattern"] != SparseConfig.pattern.value:
        overrides["pattern"] = row["pattern"]
    return common.selection_label(row["density"], overrides)


def passkeys(row: dict) -> str:
    if not row.get("passkey"):
        return "-"
    right = lambda p: sum(case["right"] for case in p["cases"])  # noqa: E731
    return f"{right(row['passkey'])}/{right(row['dense_passkey'])}"


def frontier_rows(fidelity: dict, ttft: dict) -> list[dict]:
    timings = ttft_by_selection(ttft)
    rows = []
    for row in fidelity["rows"]:
        timing = timings.get((selection_key(row), row["seq_len"]), {})
        oracle = row.get("oracle", {})
        rows.append({
            "seq_len": row["seq_len"], "config": selection_label(row), "computed": row["computed_fraction"],
            "ppl_change": row["ppl_change"], "top1": row["top1_agreement"], "kl": row["kl"],
            "oracle_kl": oracle.get("kl"), "oracle_top1": oracle.get("top1_agreement"), "passkeys": passkeys(row),
            "speedup": timing.get("speedup_vs_eager"), "ttft_s": timing.get("ttft_s"),
        })
    return sorted(rows, key=lambda r: (r["seq_len"], r["computed"], r["config"]))


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def table(rows: list[dict]) -> str:
    lines = ["| N | selection | computed | ppl vs dense | top-1 | KL | oracle KL | KL ratio | passkeys "
             "| TTFT speedup |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["kl"] / r["oracle_kl"] if r["oracle_kl"] else None
        lines.append(f"| {common.length_label(r['seq_len'])} | {r['config']} | {r['computed']:.3f} | "
                     f"{r['ppl_change']:+.2%} | {r['top1']:.3f} | {r['kl']:.4f} | {_fmt(r['oracle_kl'], '.4f')} | "
                     f"{_fmt(ratio, '.2f')} | {r['passkeys']} | {_fmt(r['speedup'], '.2f', 'x')} |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted({r["seq_len"] for r in rows if r["speedup"] is not None})
    if not lengths:
        return False
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        timed = [r for r in rows if r["seq_len"] == n and r["speedup"] is not None]
        for r in timed:
            ax.scatter(r["speedup"], r["kl"], color="C0")
            ax.annotate(r["config"], (r["speedup"], r["kl"]), fontsize=7)
            if r["oracle_kl"] is not None:
                ax.scatter(r["speedup"], r["oracle_kl"], color="C1", marker="x")
        ax.set(title=f"{common.length_label(n)}: search (dot), oracle at equal cost (x)",
               xlabel="TTFT speedup over eager", ylabel="KL(dense || sparse)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--fidelity", type=Path, required=True, help="fidelity.py's JSON")
    p.add_argument("--ttft", type=Path, required=True, help="compile_ttft.py's JSON")
    p.add_argument("--out", type=Path, required=True, help="folder frontier.md, .json and .png are written to")
    args = p.parse_args(argv)
    fidelity, ttft = json.loads(args.fidelity.read_text()), json.loads(args.ttft.read_text())
    rows = frontier_rows(fidelity, ttft)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    print(text)
    (args.out / "frontier.md").write_text(text + "\n")
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=1))
    title = f"quality: {fidelity['model']}; TTFT: {ttft['model']} ({ttft['environment'].get('device', '')})"
    if plot(args.out / "frontier.png", rows, title):
        print(f"wrote {args.out / 'frontier.png'}")


if __name__ == "__main__":
    main()
