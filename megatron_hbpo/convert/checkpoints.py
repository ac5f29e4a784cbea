"""Offline conversion: HF checkpoint <-> Megatron dist checkpoint (single process, CPU).

A converted checkpoint is a directory:

    hbpo_checkpoint.json   what it is (family, vocab and padded vocab, dtype, source)
    megatron/              Megatron dist_checkpointing (torch_dist) weights, loadable at any TP/PP
    hf/                    the HF config, generation config and tokenizer files, so training and
                           evaluation need no other path

Both directions stream: HF -> Megatron reads one layer's tensors at a time into a Megatron model
built without random init (peak: the model plus one layer); Megatron -> HF writes shards of at most
`max_shard_bytes` (peak: the model plus one shard). Outputs appear atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_hbpo.atomic import atomic_directory
from megatron_hbpo.config import ParallelConfig
from megatron_hbpo.convert.hf_io import (
    CheckpointError,
    HFCheckpoint,
    copy_side_files,
    load_hf_config,
    write_safetensors,
)
from megatron_hbpo.convert.mapping import hf_to_megatron_tensors, megatron_checkpoint_shapes, megatron_to_hf

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MARKER = "hbpo_checkpoint.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# safetensors dtype -> the Megatron dtype that holds it exactly (fp16 has more mantissa than bf16).
_STORED_DTYPES = {"BF16": "bf16", "F32": "fp32", "F16": "fp32", "F64": "fp32"}


def source_dtype(source: HFCheckpoint) -> str:
    """The dtype an HF checkpoint's weights are stored in, as bf16 or fp32: fp32 when any tensor is
    wider than bf16, so that the default conversion never rounds weights."""
    stored = source.stored_dtypes()
    return "bf16" if stored and all(_STORED_DTYPES.get(d) == "bf16" for d in stored) else "fp32"


def _cpu_world_of_one() -> None:
    """Conversion runs on the CPU in a world of one, whatever the machine has."""
    from megatron_hbpo.megatron import parallel

    parallel.initialize(ParallelConfig(), seed=0)


def _build(hf_config: PretrainedConfig, dtype: str):
    from megatron_hbpo.megatron.model import build_gpt_model, model_config_from_hf

    model_cfg = model_config_from_hf(hf_config, params_dtype=dtype, transformer_impl="local")
    return build_gpt_model(hf_config, model_cfg, ParallelConfig(), initialize=False), model_cfg


def hf_to_megatron_checkpoint(hf_dir: str | Path, out: str | Path, *, dtype: str | None = None,
                              overwrite: bool = False) -> dict:
    """Convert an HF Qwen2/Llama checkpoint directory; returns timing and size figures and the dtype
    written. `dtype` None: the source's (`source_dtype`), so an fp32 checkpoint stays fp32."""
    from megatron_hbpo.megatron.checkpoint import save_weights
    from megatron_hbpo.megatron.model import padded_vocab_size

    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    start = time.perf_counter()
    source = HFCheckpoint(hf_dir)
    source.validate()
    dtype = dtype or source_dtype(source)
    _cpu_world_of_one()
    gpt, model_cfg = _build(source.config, dtype)
    params = dict(gpt.named_parameters())
    padded = padded_vocab_size(source.config.vocab_size, 1, model_cfg.make_vocab_size_divisible_by)
    loaded, nbytes = set(), 0
    with torch.no_grad():
        for name, tensor in hf_to_megatron_tensors(source.get, source.config, padded):
            if name not in params:
                raise CheckpointError(f"{hf_dir}: the mapping produced {name}, which the Megatron model lacks")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, the Megatron model expects "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(tensor.to(DTYPES[dtype]))
            loaded.add(name)
            nbytes += tensor.numel() * DTYPES[dtype].itemsize  # as written
    if set(params) - loaded:
        raise CheckpointError(f"{hf_dir}: no HF tensor for Megatron parameters {sorted(set(params) - loaded)[:5]}")
    read_seconds = time.perf_counter() - start
    with atomic_directory(out, overwrite=overwrite, marker=MARKER) as tmp:
        save_weights(gpt, tmp / "megatron")
        copy_side_files(source.path, tmp / "hf")
        meta = {"format": 1, "family": model_cfg.family, "vocab_size": source.config.vocab_size,
                "padded_vocab_size": padded, "dtype": dtype, "source": str(Path(hf_dir).resolve())}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return {"seconds": time.perf_counter() - start, "read_seconds": read_seconds, "hf_bytes": nbytes,
            "dtype": dtype}


def read_marker(ckpt: str | Path) -> dict:
    from megatron_hbpo.megatron.checkpoint import TRAINER_STATE

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such directory")
    if not (ckpt / MARKER).is_file():
        if (ckpt / TRAINER_STATE).is_file():
            what = f"a training-state checkpoint ({TRAINER_STATE}), not a converted one"
        elif (ckpt / "config.json").is_file():
            what = "a Hugging Face model directory (config.json), not a converted checkpoint"
        else:
            what = "not a complete converted checkpoint (was the conversion interrupted?)"
        raise CheckpointError(f"{ckpt}: no {MARKER}; {what}")
    try:
        meta = json.loads((ckpt / MARKER).read_text())
        if not isinstance(meta, dict) or not {"family", "dtype", "padded_vocab_size"} <= set(meta):
            raise ValueError("family, dtype or padded_vocab_size missing")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / MARKER}: unreadable ({e}); convert the model again") from None
    return meta


def check_converted(ckpt: Path, meta: dict, hf_config: PretrainedConfig) -> None:
    """The weights in `ckpt/megatron` are the model `ckpt/hf/config.json` describes (before loading any)."""
    from megatron_hbpo.megatron.checkpoint import CheckpointMismatchError, check_model_shapes

    if meta["family"] != hf_config.model_type:
        raise CheckpointError(f"{ckpt}: {MARKER} says {meta['family']!r} but hf/config.json describes "
                              f"{hf_config.model_type!r}; the two parts come from different models, convert again")
    try:
        check_model_shapes(ckpt / "megatron", megatron_checkpoint_shapes(hf_config, meta["padded_vocab_size"]))
    except CheckpointMismatchError as e:
        raise CheckpointError(f"{e}, not the one hf/config.json describes; the two parts come from different "
                              "models, convert again") from None


def megatron_to_hf_checkpoint(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                              overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write an HF checkpoint (safetensors shards + index, config, generation config, tokenizer)."""
    from transformers import GenerationConfig

    from megatron_hbpo.megatron.checkpoint import load_weights

    start = time.perf_counter()
    ckpt = Path(ckpt)
    meta = read_marker(ckpt)
    dtype = dtype or meta["dtype"]
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf_config = load_hf_config(ckpt / "hf")
    check_converted(ckpt, meta, hf_config)
    _cpu_world_of_one()
    gpt, _ = _build(hf_config, meta["dtype"])
    load_weights(gpt, ckpt / "megatron")
    nbytes = 0

    def tensors():
        nonlocal nbytes
        for name, tensor in gpt.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            for hf_name, hf_tensor in megatron_to_hf(name, tensor, hf_config):
                hf_tensor = hf_tensor.to(DTYPES[dtype]).contiguous()
                nbytes += hf_tensor.numel() * hf_tensor.element_size()
                yield hf_name, hf_tensor

    with atomic_directory(out, overwrite=overwrite, marker="config.json") as tmp:
        write_safetensors(tmp, tensors(), max_shard_bytes=max_shard_bytes)
        copy_side_files(ckpt / "hf", tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.update({key: "bfloat16" if dtype == "bf16" else "float32" for key in ("torch_dtype", "dtype")
                       if key in config} or {"torch_dtype": "bfloat16" if dtype == "bf16" else "float32"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (tmp / "generation_config.json").exists():
            GenerationConfig.from_model_config(hf_config).save_pretrained(str(tmp))
    return {"seconds": time.perf_counter() - start, "hf_bytes": nbytes, "dtype": dtype}


def summary_line(out: str | Path, stats: dict) -> str:
    """What a conversion tool prints when it is done: dtype, size, time, throughput and peak memory."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gigabytes = stats["hf_bytes"] / 1e9
    return (f"wrote {out}: {gigabytes:.3f} GB of {stats['dtype']} weights in {stats['seconds']:.1f} s "
            f"({gigabytes / stats['seconds']:.3f} GB/s), peak RSS {peak:.2f} GiB")
