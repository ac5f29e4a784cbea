"""What a valid recipe points to on disk, checked before any process group, model or engine starts.

`config.validate` checks a recipe by itself; `check(recipe)` then opens what it names, so that a wrong
path or a checkpoint of another model is one line naming the field and the fix (a ConfigError,
exit status 2 in train.py) instead of a traceback minutes later, from every rank:

- data.train_files / data.eval_files: each exists and is .jsonl, .json or .parquet;
- model.hf_path: a directory with a readable config.json of a supported architecture and safetensors
  weights, which agrees with the recipe's model section (`megatron.model.check_hf_config`) and whose
  context (max_position_embeddings) holds rollout.max_prompt_length + max_response_length;
- the tokenizer (model.tokenizer_path, else model.hf_path; data.source=files): loadable, with a chat
  template (every prompt is built with it), and no larger than the vocabulary;
- checkpoint.resume (`--resume`): the checkpoint it names exists, is complete and holds this
  recipe's model (tensor names and global shapes, from its metadata: nothing is loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_hbpo.config import ConfigError, ModelConfig, Recipe

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def check(recipe: Recipe) -> None:
    """Raise ConfigError (one line naming the field) for the first problem found."""
    _check_data_files(recipe)
    hf_config = _check_hf_path(recipe)
    if recipe.data.source == "files":
        _check_tokenizer(recipe.model)
    _check_resume(recipe, hf_config)


def _check_data_files(recipe: Recipe) -> None:
    from megatron_hbpo.data.prompts import DATA_SUFFIXES

    d = recipe.data
    if d.source != "files":
        return
    for field, files in (("data.train_files", d.train_files), ("data.eval_files", d.eval_files)):
        for i, name in enumerate(files):
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"{field}[{i}]: {name}: no such file")
            if path.suffix.lower() not in DATA_SUFFIXES:
                raise ConfigError(f"{field}[{i}]: {name}: unsupported file type {path.suffix!r}; use "
                                  f"{', '.join(DATA_SUFFIXES)} (tools/prepare_data.py converts other formats)")


def _check_hf_path(recipe: Recipe) -> PretrainedConfig | None:
    from megatron_hbpo.convert.hf_io import CheckpointError, HFCheckpoint
    from megatron_hbpo.megatron.model import check_hf_config

    m, r = recipe.model, recipe.rollout
    if not m.hf_path:
        return None
    try:
        hf_config = HFCheckpoint(m.hf_path).config  # config.json, architecture, safetensors weights
    except CheckpointError as e:
        raise ConfigError(f"model.hf_path: {e}") from None
    check_hf_config(m, hf_config)
    limit = getattr(hf_config, "max_position_embeddings", None)
    context = r.max_prompt_length + r.max_response_length
    if limit is not None and context > limit:
        raise ConfigError(f"rollout.max_response_length: max_prompt_length + max_response_length = {context} "
                          f"exceeds the model's context, {limit} positions ({m.hf_path}/config.json "
                          "max_position_embeddings); shorten them")
    return hf_config


def _check_tokenizer(m: ModelConfig) -> None:
    from transformers import AutoTokenizer

    from megatron_hbpo.convert.hf_io import first_line

    field = "model.tokenizer_path" if m.tokenizer_path else "model.hf_path"
    path = m.tokenizer_path or m.hf_path
    if path is None:  # validated in train.main: data.source=files needs one of them
        return
    if not Path(path).is_dir():
        raise ConfigError(f"{field}: {path}: no such directory")
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{field}: no usable tokenizer in {path} ({first_line(e)})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{field}: the tokenizer in {path} has no chat template (tokenizer_config.json "
                          "chat_template or chat_template.jinja), and every prompt is built with it; use a chat "
                          "model's tokenizer or add its template to the directory")
    if len(tokenizer) > m.vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the {len(tokenizer)} tokens of the "
                          f"tokenizer in {path}; raise it")


def _check_resume(recipe: Recipe, hf_config: PretrainedConfig | None) -> None:
    from megatron_hbpo.convert.mapping import megatron_checkpoint_shapes
    from megatron_hbpo.megatron.checkpoint import CheckpointMismatchError, check_model_shapes, resolve_resume
    from megatron_hbpo.megatron.model import hf_config_from_recipe, padded_vocab_size

    c, m = recipe.checkpoint, recipe.model
    try:
        path = resolve_resume(c.resume, c.dir)
    except FileNotFoundError as e:
        raise ConfigError(f"{e} (--resume sets it)") from None
    if path is None:
        return
    config = hf_config if hf_config is not None else hf_config_from_recipe(m)
    padded = padded_vocab_size(config.vocab_size, recipe.parallel.tensor_model_parallel_size,
                               m.make_vocab_size_divisible_by)
    try:
        check_model_shapes(path, megatron_checkpoint_shapes(config, padded), allow_extra=True)
    except CheckpointMismatchError as e:
        if c.resume == "auto":
            raise ConfigError(f"checkpoint.dir: the newest checkpoint, {e}; point checkpoint.dir to this recipe's "
                              "checkpoints, or start fresh with --resume none") from None
        raise ConfigError(f"checkpoint.resume (--resume): {e}; resume a checkpoint of this recipe's model, "
                          "or start fresh with --resume none") from None
