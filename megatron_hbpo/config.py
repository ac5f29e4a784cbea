"""Recipe configuration: typed dataclasses, YAML loading with `extends:`, dotted overrides, validation.

A recipe is a YAML file whose top-level sections map onto the dataclasses below. Every field has a
type and (except the model architecture) a default; the HBPO defaults are the paper's
(../shared/HBPO_SPEC.md s5). Loading goes:

    YAML (+ the files it `extends:`, merged depth-first) -> dotted overrides -> dataclasses -> validate

and fails with a one-line `ConfigError` naming the field and the fix, before any process group
starts. `python -m megatron_hbpo.config --config R.yaml [a.b=c ...]` prints the resolved recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

REQUIRED: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A recipe problem; the message is one line that names the field and the fix."""


@dataclass
class ModelConfig:
    """Architecture of the policy (a dense decoder: Qwen2 or Llama 3 family).

    The architecture is spelled out in the recipe so that it validates without the checkpoint on
    disk; when `hf_path` is set, the model builder checks it against the checkpoint's config.json.
    """

    family: Literal["qwen2", "llama"] = REQUIRED
    num_layers: int = REQUIRED
    hidden_size: int = REQUIRED
    ffn_hidden_size: int = REQUIRED
    num_attention_heads: int = REQUIRED
    num_query_groups: int = REQUIRED
    vocab_size: int = REQUIRED
    max_position_embeddings: int = REQUIRED
    # Hugging Face checkpoint directory (weights, config.json, tokenizer); null = random init.
    hf_path: Optional[str] = None
    # Tokenizer directory when it differs from hf_path.
    tokenizer_path: Optional[str] = None
    # Per-head dimension; null = hidden_size / num_attention_heads.
    kv_channels: Optional[int] = None
    rope_theta: float = 10000.0
    # Llama-3 style scaling, as in the HF config ({rope_type: llama3, factor: ..., ...}).
    rope_scaling: Optional[dict] = None
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # bf16 on GPU (fp32 master weights in the optimizer); fp32 for exact CPU runs.
    params_dtype: Literal["fp32", "bf16"] = "bf16"
    # The embedding/output vocabulary is padded to a multiple of this times TP (padding is masked
    # out of the log-softmax).
    make_vocab_size_divisible_by: int = 128
    # Layer implementation: Transformer Engine when CUDA and TE are present ("auto"), or forced.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # Core attention (docs/attention.md): "te" (Transformer Engine, needs its layers), "sdpa" (torch
    # scaled_dot_product_attention), "unfused" (Megatron's explicit softmax); "auto" = te with TE
    # layers, sdpa otherwise.
    attention_backend: Literal["auto", "te", "sdpa", "unfused"] = "auto"
    # FP8 training (Transformer Engine only): null, "delayed" scaling or "current" (per-tensor) scaling.
    fp8: Optional[Literal["delayed", "current"]] = None
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    # With FP8, this many first and last layers stay in bf16.
    fp8_bf16_layers: int = 1


@dataclass
class ParallelConfig:
    """Megatron model parallelism; data parallelism is what is left of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # Activation recomputation: null (store everything), "selective" (attention core) or "full"
    # (every layer recomputed from its input in the backward pass).
    recompute_granularity: Optional[Literal["selective", "full"]] = None


@dataclass
class ClusterConfig:
    """The job's shape. On CPU a "GPU" is one process."""

    nodes: int = 1
    gpus_per_node: int = 1
    # The accelerator the plan (python -m megatron_hbpo.plan) checks the recipe against.
    gpu: Literal["cpu", "H100-80GB", "H200-141GB"] = "H100-80GB"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class RefitCheckConfig:
    """Stop the run when a refit leaves the rollout engine off the trained weights (algo/mismatch.py).

    From step 2 on (and on the first step after a resume) the step's mean |logp_rollout - logp_train|
    over the sampled tokens must stay below max(factor x its step-1 value, the dtype's ceiling).
    Ceilings: fp32 engines agree to 2e-7-2e-6 and bf16 to 1e-3-4e-2 on the same weights (measured on
    tiny models, the larger value on deliberately peaked ones), while a stale output layer gives log-prob
    errors near 2; each ceiling sits well above the first and well below the last.
    """

    enabled: bool = True
    factor: float = 10.0
    ceiling_fp32: float = 1e-3
    ceiling_bf16: float = 0.1


@dataclass
class RolloutConfig:
    """Rollout generation (vLLM)."""

    engine: Literal["vllm"] = "vllm"
    # Rollouts per prompt, split evenly over the budgets (n in HBPO_SPEC.md s1).
    n_rollouts: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int = 1024
    # L_max of the reward (HBPO_SPEC.md s2): the budget prefix does not count toward it.
    max_response_length: int = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    refit_check: RefitCheckConfig = field(default_factory=RefitCheckConfig)


@dataclass
class AlgoConfig:
    """HBPO knobs (HBPO_SPEC.md s1-s4); `name: grpo` selects the GRPO baseline."""

    name: Literal["hbpo", "grpo"] = "hbpo"
    # Token budgets b_1 < ... < b_k; GRPO uses none ([]).
    budgets: list[int] = field(default_factory=lambda: [512, 1024, 2048, 2560])
    budget_template: str = " I will answer the question within {budget} tokens"
    think_open: str = "<think>"
    think_close: str = "</think>"
    beta: float = 4.0
    alpha: float = 1.0 / 4096
    # Reward for a response with no `</think>` or no extractable answer (truncations land here).
    format_error_reward: float = 0.0
    w_intra: float = 1.0
    # Subtract the prompt's mean intra-budget term (our addition, HBPO_SPEC.md s3; paper = false).
    center_intra: bool = False
    adv_eps: float = 1e-6
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    dual_clip_c: float = 3.0
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Truncated importance sampling against the rollout engine's log-probs: weight each token by
    # min(pi_train_old / pi_rollout, tis_cap); null = off (the engines agree to ~1e-6 in fp32).
    tis_cap: Optional[float] = None


@dataclass
class VerifierConfig:
    """Answer checking with math-verify in worker processes."""

    num_workers: int = 2
    # Wall-clock seconds one answer may take before it is scored incorrect and its worker replaced.
    timeout_s: float = 5.0


@dataclass
class TrainConfig:
    """The outer loop: rollout batches and the optimizer steps taken on each."""

    prompts_per_step: int = 64
    # Prompts per optimizer step: prompts_per_step / mini_batch_prompts optimizer steps per batch.
    mini_batch_prompts: int = 16
    total_steps: int = 629
    # Sequence-packing budget of one micro-batch, in tokens (prompt + response) per rank.
    micro_batch_tokens: int = 16384
    seed: int = 1234


@dataclass
class OptimizerConfig:
    name: Literal["adam"] = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: Literal["constant", "warmup_constant", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    use_distributed_optimizer: bool = True


@dataclass
class DataConfig:
    """Prompt datasets (jsonl or parquet rows with `problem` and `answer`)."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    problem_key: str = "problem"
    answer_key: str = "answer"
    # User turn; `{problem}` is replaced by the row's problem (DeepScaleR's instruction).
    prompt_template: str = (
        "{problem} Let's think step by step and output the final answer within \\boxed{{}}."
    )
    system_prompt: Optional[str] = None
    shuffle: bool = True
    # Skip (and count) rows with a missing field or empty answer instead of failing on them.
    skip_bad_rows: bool = False
    # "files": train_files; "synthetic": the embedded graded task (megatron_hbpo/data/synthetic.py),
    # generated in code with its own word-level tokenizer (the recipe's model then needs no hf_path).
    source: Literal["files", "synthetic"] = "files"
    # Difficulty levels of the synthetic task (level l = l additions).
    synthetic_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])


@dataclass
class WarmupConfig:
    """Supervised warm-up in the same Megatron stack before RL (the synthetic task's base model).

    The responses follow `style_mix` whatever the problem's difficulty or the budget in the prompt:
    an "over-thinking" base model that mostly writes verbose chains and ignores budgets.
    """

    steps: int = 0  # 0: no warm-up (a pretrained hf_path is the base)
    sequences_per_step: int = 64
    # Defaults: the settings measured in README.md (recipes/tiny_cpu.yaml).
    lr: float = 2.0e-3
    min_lr: float = 2.0e-4
    # Weight decay helps a small model past its plateau on the arithmetic (grokking-style).
    weight_decay: float = 0.1
    # Shares of the response styles (data/synthetic.py: concise, steps, checked, verbose).
    style_mix: dict = field(default_factory=lambda: {"verbose": 0.8, "checked": 0.05, "steps": 0.05,
                                                     "concise": 0.1})
    # Chance that an addition's first result is wrong (caught by the checks in checked/verbose).
    error_rate: float = 0.1
    # Share of warm-up prompts that carry a random budget prefix (so the base has seen the sentence),
    # drawn from prompt_budgets (empty: algo.budgets). A GRPO baseline names HBPO's budgets here so
    # that both start from the same base.
    budget_prompt_fraction: float = 0.5
    prompt_budgets: list[int] = field(default_factory=list)
    # Where the warm-up weights are kept; recipes that share a base (HBPO and its GRPO baseline)
    # point to the same directory and the second one reuses it.
    dir: Optional[str] = None
    seed: int = 4321


@dataclass
class EvalConfig:
    """Evaluation by level and prompt mode (natural, each budget) before and after training."""

    # Evaluate the base before training and the policy after it, and write summary.json + plot.
    before_after: bool = False
    # Also every N training steps (0: never), logged with the training metrics.
    interval: int = 0
    problems_per_level: int = 64
    samples_per_problem: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 2718


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    save_interval: int = 50
    keep_last: int = 3
    # "auto": newest complete checkpoint in `dir` if any; "none": start fresh; else a path.
    resume: str = "auto"


@dataclass
class LoggingConfig:
    dir: str = "runs"
    tensorboard: bool = True
    jsonl: bool = True
    progress_bar: bool = True
    # Tokens whose |logp_rollout - logp_train| exceeds this count toward the mismatch fraction.
    mismatch_threshold: float = 0.1
    # Run directories whose summary.json is drawn beside this run's in summary.png (e.g. the GRPO
    # baseline next to HBPO).
    compare_with: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    name: str = REQUIRED
    model: ModelConfig = REQUIRED
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        model_parallel = (
            p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        )
        return self.cluster.world_size // model_parallel

    @property
    def head_dim(self) -> int:
        m = self.model
        return m.kv_channels if m.kv_channels is not None else m.hidden_size // m.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    """`top` wins; mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The recipe's mapping with its `extends:` parents merged in (parents first, in list order)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"{path}: extends: cycle {cycle}; remove one of the links")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: extends: must be a file name or a list of them")
    merged: dict = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError(f"{path}: extends: {parent!r} not found next to the recipe")
        merged = _deep_merge(merged, load_raw(parent_path, (*_chain, path)))
    return _deep_merge(merged, data)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.field=value` overrides; values are parsed as YAML (`[512,1024]`, `true`, `1e-6`)."""
    raw = _deep_merge({}, raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. algo.budgets=[512,1024]")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {key}: cannot parse value {text!r} as YAML") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {key}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


# --------------------------------------------------------------------------------------------------
# Mapping -> dataclasses, with type checking
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; returns the value (ints widened to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        (inner,) = args
        return _convert(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            fix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}{fix}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # PyYAML reads `1e-6` (no dot) as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug in this module, not the recipe


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?" if hint else (
                f"known fields: {', '.join(fields)}"
            )
            raise ConfigError(f"{where}: unknown field; {fix}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required field is missing; set it in the recipe")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Validation: cross-field rules, before any process group starts
# --------------------------------------------------------------------------------------------------


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def validate(recipe: Recipe, world_size: int | None = None) -> Recipe:
    """Raise ConfigError on the first inconsistency. `world_size`: the launched job's (WORLD_SIZE)."""
    m, p, c, r, a = recipe.model, recipe.parallel, recipe.cluster, recipe.rollout, recipe.algo
    t, o, v, ck = recipe.train, recipe.optimizer, recipe.verifier, recipe.checkpoint

    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "vocab_size", "max_position_embeddings"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    _check(m.num_attention_heads % m.num_query_groups == 0, "model.num_query_groups",
           f"{m.num_query_groups} does not divide num_attention_heads={m.num_attention_heads} (GQA groups "
           "must split the heads evenly)")
    if m.kv_channels is None:
        _check(m.hidden_size % m.num_attention_heads == 0, "model.kv_channels",
               f"hidden_size={m.hidden_size} is not a multiple of num_attention_heads="
               f"{m.num_attention_heads}; set kv_channels (the head dimension) explicitly")
    else:
        _check(m.kv_channels > 0, "model.kv_channels", f"must be positive, got {m.kv_channels}")
    _check(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}")
    _check(m.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by",
           f"must be >= 1, got {m.make_vocab_size_divisible_by}")
    _check(not (m.attention_backend == "te" and m.transformer_impl == "local"), "model.attention_backend",
           "te needs Transformer Engine layers; set model.transformer_impl to auto or transformer_engine, or use "
           "attention_backend sdpa")
    if m.fp8 is not None:
        _check(m.transformer_impl != "local", "model.fp8",
               "FP8 needs Transformer Engine layers; set model.transformer_impl to auto or transformer_engine")
        _check(m.params_dtype == "bf16", "model.fp8", "FP8 training keeps bf16 params; set model.params_dtype=bf16")
        _check(0 <= 2 * m.fp8_bf16_layers < m.num_layers, "model.fp8_bf16_layers",
               f"{m.fp8_bf16_layers} first + last bf16 layers leave no FP8 layer of {m.num_layers}")
    if m.rope_scaling is not None:
        _check(m.rope_scaling.get("rope_type", m.rope_scaling.get("type")) == "llama3", "model.rope_scaling",
               f"only Llama-3 rope scaling ({{rope_type: llama3, factor: ...}}) is supported, got {m.rope_scaling}")
    _check(m.norm_epsilon > 0, "model.norm_epsilon", f"must be positive, got {m.norm_epsilon}")

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        _check(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    _check(m.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
           f"{tp} does not divide model.num_attention_heads={m.num_attention_heads}; pick a divisor")
    _check(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size",
           f"{tp} does not divide model.num_query_groups={m.num_query_groups}; pick a divisor")
    _check(m.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
           f"{pp} does not divide model.num_layers={m.num_layers}; pick a divisor")
    _check(not (p.sequence_parallel and tp == 1), "parallel.sequence_parallel",
           "needs tensor_model_parallel_size > 1; set it to false")

    _check(c.nodes >= 1, "cluster.nodes", f"must be >= 1, got {c.nodes}")
    _check(c.gpus_per_node >= 1, "cluster.gpus_per_node", f"must be >= 1, got {c.gpus_per_node}")
    if world_size is not None:
        _check(world_size == c.world_size, "cluster.gpus_per_node",
               f"the recipe describes {c.nodes} node(s) x {c.gpus_per_node} = {c.world_size} processes but "
               f"the job was launched with WORLD_SIZE={world_size}; set cluster.nodes/cluster.gpus_per_node "
               "to match the launch")
    _check(c.world_size % (tp * pp * cp) == 0, "parallel",
           f"tensor ({tp}) x pipeline ({pp}) x context ({cp}) = {tp * pp * cp} does not divide the world "
           f"size {c.world_size} (cluster.nodes x cluster.gpus_per_node)")
    dp = recipe.data_parallel_size

    _check(r.n_rollouts >= 1, "rollout.n_rollouts", f"must be >= 1, got {r.n_rollouts}")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.max_prompt_length >= 1, "rollout.max_prompt_length", f"must be >= 1, got {r.max_prompt_length}")
    _check(r.max_response_length >= 1, "rollout.max_response_length",
           f"must be >= 1, got {r.max_response_length}")
    context = r.max_prompt_length + r.max_response_length
    _check(context <= m.max_position_embeddings, "rollout.max_response_length",
           f"max_prompt_length + max_response_length = {context} exceeds the model's context "
           f"model.max_position_embeddings={m.max_position_embeddings}; shorten them")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size",
           f"must be >= 1, got {r.tensor_parallel_size}")
    _check(c.world_size % r.tensor_parallel_size == 0, "rollout.tensor_parallel_size",
           f"{r.tensor_parallel_size} does not divide the world size {c.world_size}")
    _check(m.num_attention_heads % r.tensor_parallel_size == 0, "rollout.tensor_parallel_size",
           f"{r.tensor_parallel_size} does not divide model.num_attention_heads={m.num_attention_heads}")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
           f"must be in (0, 1], got {r.gpu_memory_utilization}")
    rc = r.refit_check
    _check(rc.factor >= 1, "rollout.refit_check.factor", f"must be >= 1, got {rc.factor}")
    _check(rc.ceiling_fp32 > 0 and rc.ceiling_bf16 > 0, "rollout.refit_check",
           f"ceilings must be > 0, got ceiling_fp32={rc.ceiling_fp32}, ceiling_bf16={rc.ceiling_bf16}")

    if a.name == "grpo":
        _check(not a.budgets, "algo.budgets",
               f"GRPO samples without budget prompts; set algo.budgets=[] (got {a.budgets})")
    else:
        k = len(a.budgets)
        _check(k >= 1, "algo.budgets", "HBPO needs at least one budget, e.g. [512, 1024, 2048, 2560]")
        _check(all(b > 0 for b in a.budgets), "algo.budgets", f"budgets must be positive, got {a.budgets}")
        _check(all(x < y for x, y in zip(a.budgets, a.budgets[1:])), "algo.budgets",
               f"must be strictly increasing, got {a.budgets}; list each budget once, in ascending order")
        _check(a.budgets[-1] < r.max_response_length, "algo.budgets",
               f"largest budget {a.budgets[-1]} must be below rollout.max_response_length="
               f"{r.max_response_length} (L_max); lower it or raise the response length")
        _check(r.n_rollouts % k == 0, "rollout.n_rollouts",
               f"{r.n_rollouts} rollouts cannot be split evenly over {k} budgets; use a multiple of {k}")
        _check("{budget}" in a.budget_template, "algo.budget_template",
               f"must contain '{{budget}}', got {a.budget_template!r}")
        try:
            a.budget_template.format(budget=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"algo.budget_template: not a valid format string ({e}); "
                              "escape literal braces as {{ }}") from None
    _check(bool(a.think_open) and bool(a.think_close), "algo.think_open",
           "think_open and think_close must be non-empty strings")
    _check(a.beta > 0, "algo.beta", f"must be > 0, got {a.beta}")
    _check(a.alpha >= 0, "algo.alpha", f"must be >= 0, got {a.alpha}")
    _check(a.w_intra >= 0, "algo.w_intra", f"must be >= 0, got {a.w_intra}")
    _check(a.adv_eps > 0, "algo.adv_eps", f"must be > 0, got {a.adv_eps}")
    _check(0 <= a.clip_eps_low < 1, "algo.clip_eps_low", f"must be in [0, 1), got {a.clip_eps_low}")
    _check(a.clip_eps_high >= 0, "algo.clip_eps_high", f"must be >= 0, got {a.clip_eps_high}")
    _check(a.dual_clip_c > 1, "algo.dual_clip_c", f"must be > 1 (it bounds -A*rho from above), got {a.dual_clip_c}")
    _check(a.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _check(a.tis_cap is None or a.tis_cap > 0, "algo.tis_cap", f"must be > 0 or null, got {a.tis_cap}")
    _check(all(math.isfinite(x) for x in (a.beta, a.alpha, a.format_error_reward, a.w_intra)), "algo",
           "beta, alpha, format_error_reward and w_intra must be finite numbers")

    _check(v.num_workers >= 1, "verifier.num_workers", f"must be >= 1, got {v.num_workers}")
    _check(v.timeout_s > 0, "verifier.timeout_s", f"must be > 0, got {v.timeout_s}")

    _check(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    _check(t.mini_batch_prompts >= 1, "train.mini_batch_prompts", f"must be >= 1, got {t.mini_batch_prompts}")
    _check(t.prompts_per_step % t.mini_batch_prompts == 0, "train.mini_batch_prompts",
           f"{t.mini_batch_prompts} does not divide train.prompts_per_step={t.prompts_per_step}")
    _check(t.mini_batch_prompts % dp == 0, "train.mini_batch_prompts",
           f"{t.mini_batch_prompts} prompts cannot be shared evenly by {dp} data-parallel ranks; "
           f"use a multiple of {dp}")
    _check(t.total_steps >= 1, "train.total_steps", f"must be >= 1, got {t.total_steps}")
    _check(t.micro_batch_tokens >= context, "train.micro_batch_tokens",
           f"{t.micro_batch_tokens} cannot hold one full sequence of {context} tokens "
           "(max_prompt_length + max_response_length); raise it")

    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, lr], got {o.min_lr}")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optimizer.adam_beta1",
           f"Adam betas must be in [0, 1), got ({o.adam_beta1}, {o.adam_beta2})")
    _check(o.adam_eps > 0, "optimizer.adam_eps", f"must be > 0, got {o.adam_eps}")
    _check(o.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0 (0 disables clipping), got {o.clip_grad}")
    _check(o.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", f"must be >= 0, got {o.lr_warmup_steps}")

    _check(ck.save_interval >= 1, "checkpoint.save_interval", f"must be >= 1, got {ck.save_interval}")
    _check(ck.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {ck.keep_last}")
    _check("{problem}" in recipe.data.prompt_template, "data.prompt_template",
           "must contain '{problem}'")
    d, w, e = recipe.data, recipe.warmup, recipe.eval
    if d.source == "synthetic":
        _check(bool(d.synthetic_levels) and all(x >= 1 for x in d.synthetic_levels), "data.synthetic_levels",
               f"needs levels >= 1, got {d.synthetic_levels}")
        _check(m.hf_path is None, "model.hf_path", "the synthetic task brings its own tokenizer and a random-init "
               "model; set model.hf_path to null or data.source to files")
    _check(w.steps >= 0, "warmup.steps", f"must be >= 0, got {w.steps}")
    if w.steps:
        _check(d.source == "synthetic", "warmup.steps", "the supervised warm-up writes synthetic-task chains; "
               "set data.source=synthetic or warmup.steps=0")
        _check(w.sequences_per_step >= dp and w.sequences_per_step % dp == 0, "warmup.sequences_per_step",
               f"{w.sequences_per_step} must be a positive multiple of the {dp} data-parallel ranks")
        _check(0 < w.min_lr <= w.lr, "warmup.lr", f"need 0 < min_lr <= lr, got {w.min_lr} and {w.lr}")
        _check(bool(w.style_mix) and all(isinstance(v, (int, float)) and v >= 0 for v in w.style_mix.values())
               and sum(w.style_mix.values()) > 0, "warmup.style_mix",
               f"needs non-negative shares with a positive sum, got {w.style_mix}")
        unknown = sorted(set(w.style_mix) - {"concise", "steps", "checked", "verbose"})
        _check(not unknown, "warmup.style_mix", f"unknown styles {unknown}; use concise, steps, checked, verbose")
        _check(0 <= w.error_rate < 1, "warmup.error_rate", f"must be in [0, 1), got {w.error_rate}")
        _check(0 <= w.budget_prompt_fraction <= 1, "warmup.budget_prompt_fraction",
               f"must be in [0, 1], got {w.budget_prompt_fraction}")
    _check(e.interval >= 0, "eval.interval", f"must be >= 0, got {e.interval}")
    _check(e.problems_per_level >= 1, "eval.problems_per_level", f"must be >= 1, got {e.problems_per_level}")
    _check(e.samples_per_problem >= 1, "eval.samples_per_problem", f"must be >= 1, got {e.samples_per_problem}")
    _check(e.temperature > 0, "eval.temperature", f"must be > 0, got {e.temperature}")
    if e.before_after or e.interval:
        _check(d.source == "synthetic" or bool(d.eval_files), "eval", "evaluation needs data.eval_files "
               "(or the synthetic task)")
    return recipe


def build_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return _build(Recipe, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, world_size: int | None = None) -> Recipe:
    """Load, merge, override, type-check and validate a recipe. Raises ConfigError (one line)."""
    raw = apply_overrides(load_raw(path), list(overrides or []))
    recipe = build_recipe(raw, str(path))
    try:
        return validate(recipe, world_size)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Validate a recipe and print it resolved.")
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.budgets=[512,1024]")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
