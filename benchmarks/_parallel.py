"""Tensor-parallel benchmark runs under torchrun, and per-device memory caps.

One process per device: ``torchrun --nproc-per-node 2 benchmarks/compile_ttft.py --tp 2``.
Every rank runs the same calls on the same inputs (the collectives keep them in step);
rank 0 alone prints and writes. Nothing here runs at import time.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in the tensor-parallel group."""

    mesh: object  # a 1-D DeviceMesh
    rank: int
    world: int
    backend: str

    @property
    def lead(self) -> bool:
        return self.rank == 0


def add_arguments(parser) -> None:
    parser.add_argument("--tp", type=int,
                        help="shard heads over this many devices (launch with torchrun --nproc-per-node)")
    parser.add_argument("--memory-cap-gib", type=float, help="cap each device's memory for this process (CUDA)")


def check_arguments(parser, args) -> None:
    if args.tp is not None:
        launched = os.environ.get("WORLD_SIZE")
        if args.tp < 1 or launched != str(args.tp):
            parser.error(f"--tp {args.tp} runs one process per device: torchrun --nproc-per-node {args.tp} "
                         f"{sys.argv[0]} --tp {args.tp} ...")
        if args.device not in ("cuda", "cpu"):
            parser.error("with --tp, --device is cuda (rank r uses cuda:<local rank>) or cpu")
    if args.memory_cap_gib is not None and (args.memory_cap_gib <= 0 or not args.device.startswith("cuda")):
        parser.error("--memory-cap-gib takes a positive size and a CUDA device")


def setup(args) -> tuple[torch.device, Group | None, dict]:
    """This process's device, its group (None without ``--tp``), and the record's extra entries."""
    device, group, extra = torch.device(args.device), None, {}
    if args.tp is not None:
        device, group = init(args.tp, device.type)
    if args.memory_cap_gib is not None:
        extra["memory_cap"] = cap_memory(device, args.memory_cap_gib)  # before the model is built
    return device, group, extra


def init(tp: int, device_type: str) -> tuple[torch.device, Group]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); one device per rank."""
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    dist.init_process_group(backend)
    if dist.get_world_size() != tp:
        raise SystemExit(f"--tp {tp} needs {tp} processes, torchrun started {dist.get_world_size()}")
    mesh = init_device_mesh(device_type, (tp,))
    return device, Group(mesh, dist.get_rank(), tp, backend)


def cap_memory(device: torch.device, cap_gib: float) -> dict:
    """Let this process's caching allocator use at most ``cap_gib`` of ``device``.

    Allocations beyond the cap raise an out-of-memory error as a smaller device would.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * 2**30 > total:
        raise SystemExit(f"--memory-cap-gib {cap_gib} exceeds the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    return {"cap_gib": cap_gib, "device_total_gib": total / 2**30}


def gather(value) -> list:
    """``value`` from every rank, in rank order (every rank must call this)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def annotate_row(row: dict) -> None:
    """Per-device peak memory in ``row``; ``peak_gib`` becomes the largest (what must fit on each).

    Checks that every rank got the same outcome (a rank that ran out of memory while the
    others did not would leave them waiting in a collective), and shows each rank's SDPA
    rewrite count where they differ.
    """
    outcomes = gather(row["ttft_s"] if isinstance(row["ttft_s"], str) else "ok")
    if len(set(outcomes)) > 1:
        raise RuntimeError(f"{row['system']} at N={row['seq_len']}: the ranks disagree: {outcomes}")
    rewritten = gather(row.get("sdpa_rewritten"))
    if len(set(rewritten)) > 1:  # the ranks' graphs were rewritten differently: show each
        row["sdpa_rewritten"] = " / ".join(map(str, rewritten))
    peaks = gather(row.get("peak_gib"))
    row["peak_gib_per_device"] = peaks
    known = [p for p in peaks if p is not None]
    row["peak_gib"] = max(known) if known else None


def describe(group: Group, device: torch.device) -> dict:
    """The record's ``tensor_parallel`` entry."""
    return {
        "tp": group.world, "backend": group.backend, "launcher": f"torchrun --nproc-per-node {group.world}",
        "devices": gather(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "sharding": "q/k/v, gate/up column-wise; o, down row-wise; embeddings, lm_head, norms replicated "
                    "(sa_compile.tensor_parallel)",
    }


def finish() -> None:
    """Leave the process group once every rank is done."""
    dist.barrier()
    dist.destroy_process_group()
