"""Head-sharded tensor parallelism for Hugging Face Llama models, on PyTorch's DTensor.

Each rank keeps ``H / world`` query heads and ``KV / world`` key/value heads, so the SDPA
in each rank's traced graph is a plain attention over local heads: the per-head pattern
search of the sparse pass runs on every rank without any communication. Each rank then
compiles with ``sa_compile.backend`` as a single process would::

    mesh = init_device_mesh("cuda", (2,))        # under torchrun, one process per device
    model = tensor_parallel(model, mesh)
    model = torch.compile(model, backend=sa_compile.backend)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

# Megatron-style: the projections into heads (and into the MLP's hidden units) are split by
# output features, the projections back out by input features, so a decoder layer needs
# exactly two all-reduces (after o_proj and after down_proj) and nothing in between.
_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
_SPLIT_SIZES = {
    "num_attention_heads": "each rank must hold whole query heads",
    "num_key_value_heads": "each rank must hold whole key/value heads (they are split, not replicated)",
    "intermediate_size": "each rank must hold an equal share of the MLP",
}


def _check_divisible(config, world: int) -> None:
    for name, why in _SPLIT_SIZES.items():
        size = getattr(config, name)
        if size % world:
            raise ValueError(f"tensor_parallel: config.{name}={size} does not divide by the mesh size {world}; {why}")


def _check_model(model, mesh) -> None:
    from transformers import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"tensor_parallel expects a transformers LlamaForCausalLM, got {type(model).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"tensor_parallel expects a 1-D DeviceMesh, got {mesh.ndim} dimensions; "
                         f"slice a multi-dimensional mesh first (mesh['tp'])")
    _check_divisible(model.config, mesh.size())
    for layer in model.model.layers:
        for path in _COLWISE + _ROWWISE:
            linear = layer.get_submodule(path)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"tensor_parallel: {path} is a {type(linear).__name__}, not an nn.Linear")
            if isinstance(linear.weight, DTensor):
                raise ValueError(f"tensor_parallel: {path} is already parallelized")
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if devices != {mesh.device_type}:
        raise ValueError(f"tensor_parallel: the model lives on {sorted(devices)}, the mesh on "
                         f"{mesh.device_type!r}; move the model to the mesh's device first")


def _broadcast_replicated(model, mesh, src_data_rank: int) -> None:
    """Make every rank's replicated weights those of ``src_data_rank``, as for the shards."""
    group = mesh.get_group()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor, group=group, group_src=src_data_rank)


def tensor_parallel(model, mesh, *, src_data_rank: int | None = 0):
    """Shard a Llama's attention heads and MLP across ``mesh``, in place; returns the model.

    Column-wise (by output features): ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``,
    ``up_proj``. Row-wise (by input features, outputs all-reduced): ``o_proj``,
    ``down_proj``. Replicated on every rank: the token embedding, ``lm_head``, the RMS
    norms and the rotary embedding. Activations between layers are plain, replicated
    tensors; only the sharded weights are DTensors, and every projection hands back a plain
    local tensor, so the attention sees ``H / world`` query heads and ``KV / world`` key/value
    heads.

    Args:
        model: a ``transformers.LlamaForCausalLM`` on the mesh's device type.
        mesh: a 1-D ``DeviceMesh`` (``init_device_mesh("cuda", (2,))``) of the
            tensor-parallel ranks, with the process group already initialized.
        src_data_rank: the mesh rank whose weights all ranks end up with (shards are
            scattered from it, replicated weights broadcast from it); ``None`` keeps each
            rank's own weights and communicates nothing: then they must already agree.

    Raises ``ValueError`` when the query heads, the key/value heads or the MLP's
    intermediate size do not divide by the mesh size (and ``TypeError`` for a model that
    is not a ``LlamaForCausalLM``). Use ``DynamicCache`` (the default)
    for generation: a ``StaticCache`` built from the config would be sized for all heads.

    Example::

        mesh = init_device_mesh("cpu", (2,))                          # gloo, 2 processes
        model = tensor_parallel(LlamaForCausalLM(config).eval(), mesh)
        model = torch.compile(model, backend=sa_compile.backend)
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _check_model(model, mesh)
    # Local outputs: HF's view(*shape, -1, head_dim) then counts local heads, and the graph
    # around SDPA holds plain tensors.
    plan = {f"model.layers.*.{path}": ColwiseParallel(use_local_output=True) for path in _COLWISE}
    plan.update({f"model.layers.*.{path}": RowwiseParallel(use_local_output=True) for path in _ROWWISE})
    parallelize_module(model, mesh, plan, src_data_rank=src_data_rank)
    if src_data_rank is not None:
        _broadcast_replicated(model, mesh, src_data_rank)
    return model


__all__ = ["tensor_parallel"]
