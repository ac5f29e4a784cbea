"""Reading and writing Hugging Face checkpoints (safetensors) one tensor at a time, and atomic output dirs."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_hbpo.convert.mapping import SUPPORTED_MODEL_TYPES, expected_hf_shapes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor and the fix."""


def first_line(error: BaseException) -> str:
    """A library exception as one line (transformers' messages run over several)."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def load_hf_config(path: str | Path) -> Any:
    """The transformers config of an HF model directory; CheckpointError (one line) when the directory,
    its config.json or the architecture it names is missing, unreadable or unknown to transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json; pass a Hugging Face model directory")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({first_line(e)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{file}: model_type {model_type!r} is not an architecture transformers knows; "
                              "pass a Hugging Face causal-LM directory (Qwen2 or Llama to train)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{file}: {first_line(e)}") from None


def weight_files(path: str | Path) -> list[Path]:
    """The weight files (safetensors, .bin, .pt) an engine could load from an HF model directory."""
    return sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.endswith(".gguf"))


class HFCheckpoint:
    """An HF model directory: config.json plus safetensors (one file or an index of shards).

    Tensors are read lazily (memory-mapped by safetensors), so converting never holds the whole
    checkpoint in memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = load_hf_config(self.path)
        if self.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{self.path}: unsupported architecture {self.config.model_type!r} "
                                  f"({getattr(self.config, 'architectures', None)}); supported: "
                                  f"{list(SUPPORTED_MODEL_TYPES)}")
        index = self.path / WEIGHT_INDEX
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            self.weight_map = {name: "model.safetensors" for name in self._names_in("model.safetensors")}
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or {WEIGHT_INDEX} (only safetensors weights "
                                  "are read; convert .bin files with transformers' save_pretrained first)")

    @contextlib.contextmanager
    def _open(self, file: str) -> Iterator[Any]:
        """A safetensors handle, closed after use: the file is memory-mapped, and an open handle would
        keep every page read so far in this process's resident memory."""
        from safetensors import safe_open

        try:
            handle = safe_open(str(self.path / file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{self.path / file}: unreadable safetensors file ({e}); it may be truncated "
                                  "or still being copied") from None
        with handle as opened:
            yield opened

    def _names_in(self, file: str) -> list[str]:
        with self._open(file) as handle:
            return list(handle.keys())

    def validate(self) -> None:
        """Every tensor the config implies is present with the right shape."""
        expected = expected_hf_shapes(self.config)
        missing = [name for name in expected if name not in self.weight_map]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.path}: missing tensors {missing[:5]}{more}")
        shapes = {}
        for file in sorted(set(self.weight_map[name] for name in expected)):
            with self._open(file) as handle:
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
        for name, shape in expected.items():
            got = shapes[name]
            if got != shape:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has shape {got}, config.json implies {shape}; check "
                    "hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size and vocab_size")

    def stored_dtypes(self) -> set[str]:
        """The safetensors dtypes of the weights ("BF16", "F32", ...), from the file headers."""
        dtypes: set[str] = set()
        for file in sorted(set(self.weight_map.values())):
            with self._open(file) as handle:
                dtypes.update(handle.get_slice(name).get_dtype() for name in handle.keys())
        return dtypes

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: missing tensor {name}")
        try:
            with self._open(self.weight_map[name]) as handle:
                return handle.get_tensor(name)  # keeps its own reference to the mapping
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: cannot read {name} ({e}); the file may be "
                                  "truncated") from None


def copy_side_files(source: Path, target: Path) -> None:
    """config, generation config, tokenizer and chat-template files: everything but the weights."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != WEIGHT_INDEX:
            shutil.copy2(item, target / item.name)


def write_safetensors(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], *,
                      max_shard_bytes: int = 5 * 2**30) -> dict[str, str]:
    """Write (name, tensor) pairs as HF shards + index; holds at most one shard in memory."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total = 0, 0
    files: list[tuple[str, list[str]]] = []
    weight_map: dict[str, str] = {}

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors.part"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    if shard:
        flush()
    for i, (part, names) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (out_dir / part).rename(out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
