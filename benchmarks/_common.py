"""Helpers shared by the benchmark scripts: environment record, timer, tables, JSON, plots.

Nothing here runs at import time; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce a number: hardware, versions, the command line."""
    on_cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_cuda else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sa_compile": _version("sa_compile"),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        # Other work on the host skews CPU timings; record how busy it was.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def fresh_compile_caches() -> str:
    """Point Inductor's and Triton's on-disk caches at a new empty folder for this process.

    Compile times are then cold-start times, not whatever an earlier run left on disk.
    Set before the first compile; the caches read the variables when they are first used.
    """
    folder = tempfile.mkdtemp(prefix="sa_compile_bench_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    return folder


def parse_lengths(text: str) -> list[int]:
    """``"4k,8k,1000"`` -> ``[4096, 8192, 1000]`` (k means 1024)."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        value = int(item[:-1]) * 1024 if item.endswith("k") else int(item)
        if value <= 0:
            raise ValueError(f"sequence length must be positive, got {item!r}")
        lengths.append(value)
    return lengths


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def int_or_none(text: str) -> int | None:
    """``"none"`` -> None, else the integer (a `--taper-from` style option)."""
    return None if text.lower() == "none" else int(text)


def float_or_none(text: str) -> float | None:
    """``"none"`` -> None, else the number (a `--candidates` style option)."""
    return None if text.lower() == "none" else float(text)


def parse_bool(text: str) -> bool:
    """``"true"`` / ``"false"`` (any case) -> the bool (a `--int8-estimate` style option)."""
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"expected true or false, got {text!r}")
    return value


_OVERRIDES = {"pattern": str, "query_stride": int, "taper_from": int_or_none, "candidates": float_or_none,
              "int8_estimate": parse_bool, "sampled_screen_means": parse_bool}
SELECTION_FIELDS = tuple(_OVERRIDES)  # the SparseConfig fields a selection may set beside its density
SELECTION_HELP = ("a selection is DENSITY[:field=value...], fields " + ", ".join(_OVERRIDES)
                  + " (e.g. 0.3, 0.2:query_stride=16:taper_from=none, 0.1:pattern=block_query)")


class SelectionError(ValueError, argparse.ArgumentTypeError):
    """A badly spelled selection: a ``ValueError`` whose message argparse shows as it is."""


def parse_overrides(items) -> dict:
    """``["query_stride=8", "taper_from=none"]`` -> ``SparseConfig`` field overrides: the fields
    a selection may set beside its density (see :func:`parse_selection`)."""
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in _OVERRIDES:
            raise SelectionError(f"bad override {item!r}: use field=value with field one of {', '.join(_OVERRIDES)}")
        overrides[field] = _OVERRIDES[field](value)
    return overrides


def overrides_label(overrides: dict) -> str:
    """``{"query_stride": 8}`` -> ``":query_stride=8"`` (empty for none), the spec's own spelling."""
    return "".join(f":{k}={'none' if v is None else getattr(v, 'value', v)}" for k, v in sorted(overrides.items()))


def parse_selection(text: str) -> tuple[float, dict]:
    """One spelling of a selection, wherever a command line takes one: ``DENSITY[:field=value...]``
    -> ``(density, overrides)``, as in fidelity's ``--configs 0.3:query_stride=16`` and the TTFT
    benchmark's ``--systems sa_compile@0.3:query_stride=16``."""
    density, *overrides = text.strip().split(":")
    try:
        value = float(density)
    except ValueError:
        raise SelectionError(f"bad selection {text!r}: {SELECTION_HELP}") from None
    return value, parse_overrides(overrides)


def selection_label(density: float, overrides: dict) -> str:
    """:func:`parse_selection`'s inverse: ``(0.3, {"query_stride": 16})`` -> ``"0.3:query_stride=16"``."""
    return f"{density:g}{overrides_label(overrides)}"


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Median and all samples of a timed callable, in seconds; peak memory in bytes (CUDA only)."""

    median_s: float
    samples_s: list[float]
    peak_bytes: int | None


def _time_once_cuda(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(device)


def _time_once_cpu(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_fn(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int,
            on_step: Callable[[str], None] | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return the median.

    On CUDA each run sits between two device events (the device's own time, host launch
    gaps included) and gets its own peak-memory reading; on CPU ``perf_counter`` times it.
    Example::

        t = time_fn(lambda: model(x), torch.device("cuda"), repeats=5, warmup=1)
        print(t.median_s)
    """
    for i in range(warmup):
        if on_step:
            on_step(f"warm-up {i + 1}/{warmup}")
        fn()
    synchronize(device)
    samples, peaks = [], []
    for i in range(repeats):
        if on_step:
            on_step(f"run {i + 1}/{repeats}")
        if device.type == "cuda":
            seconds, peak = _time_once_cuda(fn, device)
            peaks.append(peak)
        else:
            seconds = _time_once_cpu(fn)
        samples.append(seconds)
    return Timing(statistics.median(samples), samples, max(peaks) if peaks else None)


def time_queued(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds per call of ``calls`` calls launched back to back, with no synchronization
    between them: the cost when the host runs ahead of the device, as it does between the
    layers of a prefill, so host launch gaps hide behind earlier work. On CPU, wall time."""
    def queued():
        for _ in range(calls):
            fn()

    synchronize(device)
    seconds = _time_once_cuda(queued, device)[0] if device.type == "cuda" else _time_once_cpu(queued)
    return seconds / calls


def wall_time(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Host wall time of one call (synchronized), for first calls that include compilation."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error, also where Inductor wrapped one hit while compiling or autotuning."""
    while exc is not None:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def release_cached_memory(device: torch.device) -> None:
    """Collect garbage and hand the allocator's cached blocks back (after an OOM, say)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_memory(device: torch.device) -> None:
    """Drop compiled code and cached blocks, so the next system starts from the same state."""
    torch._dynamo.reset()
    release_cached_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Progress:
    """One line per step on stderr, with the seconds since the script started (none if not ``enabled``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.start = time.perf_counter()
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:8.1f}s] {message}", file=sys.stderr, flush=True)

    def scoped(self, prefix: str) -> Callable[[str], None]:
        return lambda message: self(f"{prefix}: {message}")


def fmt(value, digits: int = 3) -> str:
    """Table cell: floats to ``digits`` significant figures, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    cells = [[fmt(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    align = ["---:" if n else "---" for n in numeric]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def plot_panels(path: Path, panels: Sequence[dict], title: str) -> bool:
    """Draw side-by-side line plots into a PNG; False (and a note on stderr) without matplotlib.

    Each panel is ``{"title", "xlabel", "ylabel", "series": {label: (xs, ys[, style])},
    "logx", "logy", "hline", "xticks": {x: label}}``; ``style`` is passed to ``plot`` (a
    ``linestyle``, say); points whose y is None (OOM, not run) are left out.
    """
    try:
        import matplotlib
        import matplotlib.ticker
    except ImportError:
        # The table and JSON are the results; the plot is optional (the "bench" extra).
        print(f"no plot {path}: matplotlib is not installed (pip install matplotlib, or "
              f"pip install -e '.[bench]')", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for i, (ax, panel) in enumerate(zip(axes[0], panels)):
        for label, (xs, ys, *style) in panel["series"].items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label, **(style[0] if style else {}))
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="grey", linestyle="--", linewidth=1)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("xticks"):
            ax.set_xticks(list(panel["xticks"]), list(panel["xticks"].values()))
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(True, alpha=0.3)
        if i == 0:  # the panels share their series; one legend, where rising curves leave room
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_pattern_argument(parser) -> None:
    """``--pattern``: the search's template, parsed to a :class:`sa_compile.PatternKind`."""
    from sa_compile import PatternKind, SparseConfig

    parser.add_argument("--pattern", type=PatternKind, default=SparseConfig.pattern, choices=list(PatternKind),
                        metavar="{" + ",".join(kind.value for kind in PatternKind) + "}",
                        help="template that scores the blocks")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` as the benchmarks show it: the script's docstring as written, every flag's default."""


def add_run_arguments(parser, *, repeats: int, warmup: int) -> None:
    """The options every benchmark shares: timing, device, seed, caches, output."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs per case before the timed ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights")
    parser.add_argument("--warm-caches", action="store_true",
                        help="reuse on-disk Inductor/Triton caches (off: a fresh cache dir, cold compile times)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder the JSON (and PNG) results are written to")
    parser.add_argument("--tag", default="", help="suffix added to the result files' names")


def check_run_arguments(parser, args) -> None:
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the median of fewer says little)")


def series_by_length(rows: Sequence[dict], group_key: str, value_key: str, groups: Sequence[str], style=None) -> dict:
    """One plotted series per group: ``value_key`` over the sorted lengths (None where absent)."""
    lengths = sorted({r["seq_len"] for r in rows})
    out = {}
    for group in groups:
        by_len = {r["seq_len"]: r[value_key] for r in rows if r[group_key] == group}
        ys = [v if isinstance(v, float) else None for v in (by_len.get(n) for n in lengths)]
        out[group] = (lengths, ys, style(group)) if style else (lengths, ys)
    return out
