"""Full (unsharded, globally named) views of a TP/PP-sharded GPTModel stage.

A pipeline stage numbers its layers from 0; the global name adds the stage's layer offset. With
tied embeddings the last stage's `output_layer.weight` is a copy of the embedding, so it maps to
`embedding.word_embeddings.weight`. The vocabulary dimension is padded differently at each TP size;
`load_full_state` pads or trims it so that a state saved at one TP size loads at another.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_hbpo.megatron.sharding import full_shape, gather_full, shard_of

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def unwrap(module: torch.nn.Module) -> Any:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers (Any: megatron-core has no types)."""
    inner: Any = module
    while hasattr(inner, "module"):
        inner = inner.module
    return inner


def layer_offset(gpt: Any) -> int:
    from megatron.core import parallel_state

    config = gpt.config
    return parallel_state.get_pipeline_model_parallel_rank() * (
        config.num_layers // parallel_state.get_pipeline_model_parallel_world_size())


def global_name(local_name: str, gpt: torch.nn.Module) -> str:
    offset = layer_offset(gpt)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name, count=1)
    if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    if full.shape[0] == rows:
        return full
    if full.shape[0] > rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


@torch.no_grad()
def load_full_state(model: torch.nn.Module, get_full: Callable[[str], torch.Tensor]) -> None:
    """Copy full tensors (by global GPTModel name) into this rank's shards of `model`."""
    from megatron.core import parallel_state

    gpt = unwrap(model)
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    for local_name, param in gpt.named_parameters():
        name = global_name(local_name, gpt)
        full = get_full(name)
        if local_name in _VOCAB_PARAMS:
            full = _fit_rows(full, full_shape(param, world)[0])
        shard = shard_of(full, param, rank, world)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: full tensor {tuple(full.shape)} gives a shard of {tuple(shard.shape)} on TP "
                             f"rank {rank}, the parameter is {tuple(param.shape)}")
        param.copy_(shard.to(dtype=param.dtype, device=param.device))


def iter_full_tensors(model: torch.nn.Module, *, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(global name, full tensor) of this stage's parameters (or their reduced gradients).

    A collective over the TP group: every TP rank must iterate. Gradients are Megatron DDP's
    `main_grad` (the sum scaled by 1 / global token count after finalize). A tensor that is not
    TP-sharded is yielded as a view of the parameter: clone it to keep it past an optimizer step.
    """
    gpt = unwrap(model)
    for local_name, param in gpt.named_parameters():
        tensor = param.detach()
        if grads:
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
            tensor = grad
        yield global_name(local_name, gpt), gather_full(tensor.detach(), param)
