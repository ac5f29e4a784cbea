"""Full <-> tensor-parallel shard of a Megatron parameter, from the attributes Megatron sets on it.

Megatron marks each TP-split parameter with `tensor_model_parallel`, `partition_dim` and
`partition_stride`. A stride of s means the full tensor is s blocks along that dim (fc1 of a gated
MLP is [gate; up]) and each rank holds its slice of every block, concatenated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def partition_dim(param: torch.Tensor) -> int:
    """The dimension Megatron split a TP-sharded parameter along (an attribute it sets on the tensor)."""
    return int(param.partition_dim)  # type: ignore[attr-defined]


def full_shape(param: torch.Tensor, world: int) -> list[int]:
    """Shape of the full tensor whose TP shard (of `world` ranks) `param` is."""
    shape = list(param.shape)
    if is_tensor_parallel(param):
        shape[partition_dim(param)] *= world
    return shape


def shard_of(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of `full` for a parameter laid out like `param`."""
    if not is_tensor_parallel(param) or world == 1:
        return full
    dim, stride = partition_dim(param), getattr(param, "partition_stride", 1)
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(world, dim=dim)[rank] for block in blocks], dim=dim)


def gather_full(local: torch.Tensor, param: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The full tensor from every TP rank's `local` slice (a collective over the TP group)."""
    from megatron.core import parallel_state

    group = group or parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if not is_tensor_parallel(param) or world == 1:
        return local
    dim, stride = partition_dim(param), getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([torch.cat([p[j] for p in pieces], dim=dim) for j in range(stride)], dim=dim)
