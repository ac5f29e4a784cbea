"""Live TP/PP-sharded Megatron model -> HF-named full tensors in size-bounded buckets (the refit stream).

Every rank of the job iterates the same stream and receives the same buckets, in the same order on
every call: pipeline stage by stage, each stage's parameters in module order. The stage that owns
a parameter gathers it over its TP group; the full tensor is then broadcast over the pipeline
group. A bucket is yielded before it would exceed `bucket_bytes` (a tensor larger than that is a
bucket of its own), so the stream holds at most one bucket plus one tensor, never the whole model.
The HF names come from the same mapping as the offline converter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_hbpo.convert.mapping import megatron_to_hf
from megatron_hbpo.megatron.sharding import full_shape, gather_full
from megatron_hbpo.megatron.state import global_name, unwrap

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Bucket = list[tuple[str, torch.Tensor]]


class HFExportStream:
    """Iterate to get buckets [(hf_name, full tensor)].

    `peak_bytes`: the most the stream has held at once (at most bucket_bytes + max_tensor_bytes).
    """

    def __init__(self, model: torch.nn.Module, hf_config: PretrainedConfig, *, bucket_bytes: int):
        from megatron.core import parallel_state

        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.gpt = unwrap(model)
        self.hf_config = hf_config
        self.bucket_bytes = bucket_bytes
        self.peak_bytes = 0
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._pp_ranks = dist.get_process_group_ranks(self._pp_group)
        self._pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        tp_world = parallel_state.get_tensor_model_parallel_world_size()
        self._params = dict(self.gpt.named_parameters())
        local = [(global_name(name, self.gpt), name, full_shape(p, tp_world), p.dtype)
                 for name, p in self._params.items()]
        # Which stage owns what, with shapes, so that receivers can allocate: exchanged once.
        stages: list = [None] * len(self._pp_ranks)
        dist.all_gather_object(stages, local, group=self._pp_group)
        self._plan = []
        seen = set()
        for stage, entries in enumerate(stages):
            for name, local_name, shape, dtype in entries:
                if name in seen:  # the last stage's copy of tied embeddings
                    continue
                seen.add(name)
                self._plan.append((stage, name, local_name, shape, dtype))
        # The largest full (gathered, padded) tensor: the stream holds at most a bucket plus this.
        self.max_tensor_bytes = max(torch.Size(shape).numel() * dtype.itemsize for _, _, _, shape, dtype in self._plan)

    def hf_plan(self) -> list[tuple[str, tuple[int, ...]]]:
        """The (HF name, shape) of every tensor the stream will yield, in order, known before any is
        gathered: the mapping runs on meta tensors of the full shapes. A consumer checks it against its
        model first, so that a stream that does not fit loads nothing."""
        plan = []
        for _, name, _, shape, dtype in self._plan:
            for hf_name, tensor in megatron_to_hf(name, torch.empty(shape, dtype=dtype, device="meta"), self.hf_config):
                plan.append((hf_name, tuple(tensor.shape)))
        return plan

    def _full_tensor(self, stage: int, local_name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        if stage == self._pp_rank:
            param = self._params[local_name]
            full = gather_full(param.detach(), param)
        else:
            device = next(iter(self._params.values())).device
            full = torch.empty(shape, dtype=dtype, device=device)
        if len(self._pp_ranks) > 1:
            dist.broadcast(full, src=self._pp_ranks[stage], group=self._pp_group)
        return full

    def __iter__(self) -> Iterator[Bucket]:
        bucket: Bucket = []
        held = 0
        for stage, name, local_name, shape, dtype in self._plan:
            full = self._full_tensor(stage, local_name, shape, dtype)
            size = full.numel() * full.element_size()
            self.peak_bytes = max(self.peak_bytes, held + size)
            if bucket and held + size > self.bucket_bytes:
                yield bucket
                bucket, held = [], 0
            bucket.extend(megatron_to_hf(name, full, self.hf_config))
            held += size
        if bucket:
            yield bucket
