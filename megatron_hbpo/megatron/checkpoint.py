"""Megatron dist_checkpointing (torch_dist) of the policy weights: resharding on load, atomic on save.

A checkpoint directory written here loads at any TP/PP size (dist_checkpointing reshards; the padded
vocabulary is TP-independent, see model.padded_vocab_size). Saving writes into a temporary sibling
directory and renames it when every rank has finished, so a crash never leaves a directory that
looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hbpo.megatron.state import unwrap


def save_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collective: every rank of the job calls it. `directory` must not exist yet."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    if directory.exists():  # every rank checks, so that all raise together instead of hanging in a barrier
        raise FileExistsError(f"{directory} exists; refusing to overwrite a checkpoint")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        os.rename(tmp, directory)
    dist.barrier()


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collective: load a checkpoint written at any TP/PP size into this rank's shards."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a complete Megatron dist checkpoint (no metadata.json)")
    gpt = unwrap(model)
    state = dist_checkpointing.load(gpt.sharded_state_dict(), str(directory))
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
