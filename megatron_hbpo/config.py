"""Recipe configuration: typed dataclasses, YAML loading with `extends:`, dotted overrides, validation.

A recipe is a YAML file whose top-level sections map onto the dataclasses below. Every field has a
type and (except the model architecture) a default; the HBPO defaults are the paper's
(docs/method.md), defined once in algo/constants.py. Loading goes:

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
from typing import Any, Literal

import yaml

from megatron_hbpo.algo.constants import (
    ADAPTTHINK_CLIP_EPS,
    ADAPTTHINK_DELTA,
    ADAPTTHINK_NOTHINKING_FRACTION,
    ADAPTTHINK_NOTHINKING_MAX_RESPONSE_LENGTH,
    ADAPTTHINK_NOTHINKING_TOKEN,
    ADAPTTHINK_REF_SAMPLES,
    ADAPTTHINK_THINKING_TOKEN,
    ADHERENCE_SOFT_MARGIN,
    ADV_EPS,
    ALPHA,
    ANYTIME_CLIP_EPS,
    ANYTIME_INSERT_ALLOWANCE,
    ANYTIME_LAM,
    ANYTIME_LOSS_NORMALIZER,
    ANYTIME_N_BUDGETS,
    ANYTIME_N_SUMMARIES,
    ANYTIME_PRESETS,
    ANYTIME_SUMMARY_MAX_TOKENS,
    ANYTIME_THINKING_BUDGET,
    BETA,
    BUDGET_TEMPLATE,
    BUDGETS,
    CLIP_EPS_HIGH,
    CLIP_EPS_LOW,
    DUAL_CLIP_C,
    L1_ALPHA,
    L1_ALPHA_MAX,
    L1_DELTA,
    L1_EVAL_TARGETS,
    L1_MAX_FRACTION,
    L1_N_MAX,
    L1_N_MIN,
    L1_STAGE,
    L_MAX,
    PROMPT_TEMPLATE,
    THINK_CLOSE,
    THINK_OPEN,
    TLMRE_ALPHA,
    TLMRE_BATCH_WHITEN,
    TLMRE_STD_EPS,
)
from megatron_hbpo.data.chat import parse_mode
from megatron_hbpo.rollout.layout import RolloutLayout, rollout_layout

REQUIRED: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A recipe problem; the message is one line that names the field and the fix."""


def bounded(default: Any = REQUIRED, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, items_gt: float | None = None, hint: str = "",
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with single-field bounds, checked when the recipe is built (`_check_bounds`).

    ge/gt/le/lt bound a number (None passes: optional fields); items_gt bounds every item of a list;
    `hint` is appended to the error ("0 disables clipping"). Cross-field rules live in `validate`.
    """
    metadata = {"bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt, "items_gt": items_gt, "hint": hint}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """Architecture of the policy (a dense decoder: Qwen2 or Llama 3 family).

    The architecture is spelled out in the recipe so that it validates without the checkpoint on
    disk; when `hf_path` is set, the model builder checks it against the checkpoint's config.json.
    """

    family: Literal["qwen2", "llama"] = REQUIRED
    num_layers: int = bounded(gt=0)
    hidden_size: int = bounded(gt=0)
    ffn_hidden_size: int = bounded(gt=0)
    num_attention_heads: int = bounded(gt=0)
    num_query_groups: int = bounded(gt=0)
    vocab_size: int = bounded(gt=0)
    max_position_embeddings: int = bounded(gt=0)
    # Hugging Face checkpoint directory (weights, config.json, tokenizer); null = random init.
    hf_path: str | None = None
    # Tokenizer directory when it differs from hf_path.
    tokenizer_path: str | None = None
    # Per-head dimension; null = hidden_size / num_attention_heads.
    kv_channels: int | None = bounded(None, gt=0)
    rope_theta: float = bounded(10000.0, gt=0)
    # Llama-3 style scaling, as in the HF config ({rope_type: llama3, factor: ..., ...}).
    rope_scaling: dict | None = None
    norm_epsilon: float = bounded(1e-6, gt=0)
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # bf16 on GPU (fp32 master weights in the optimizer); fp32 for exact CPU runs.
    params_dtype: Literal["fp32", "bf16"] = "bf16"
    # The embedding/output vocabulary is padded to a multiple of this times TP (padding is masked
    # out of the log-softmax).
    make_vocab_size_divisible_by: int = bounded(128, ge=1)
    # Layer implementation: Transformer Engine when CUDA and TE are present ("auto"), or forced.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # Core attention (docs/attention.md): "te" (Transformer Engine, needs its layers), "sdpa" (torch
    # scaled_dot_product_attention), "unfused" (Megatron's explicit softmax); "auto" = te with TE
    # layers, sdpa otherwise.
    attention_backend: Literal["auto", "te", "sdpa", "unfused"] = "auto"
    # FP8 training (Transformer Engine only): null, "delayed" scaling or "current" (per-tensor) scaling.
    fp8: Literal["delayed", "current"] | None = None
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    # With FP8, this many first and last layers stay in bf16.
    fp8_bf16_layers: int = bounded(1, ge=0)


@dataclass
class ParallelConfig:
    """Megatron model parallelism; data parallelism is what is left of the world."""

    tensor_model_parallel_size: int = bounded(1, ge=1)
    pipeline_model_parallel_size: int = bounded(1, ge=1)
    context_parallel_size: int = bounded(1, ge=1)
    sequence_parallel: bool = False
    # Activation recomputation: null (store everything), "selective" (attention core) or "full"
    # (every layer recomputed from its input in the backward pass).
    recompute_granularity: Literal["selective", "full"] | None = None


@dataclass
class ClusterConfig:
    """The job's shape. On CPU a "GPU" is one process."""

    nodes: int = bounded(1, ge=1)
    gpus_per_node: int = bounded(1, ge=1)
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
    factor: float = bounded(10.0, ge=1)
    ceiling_fp32: float = bounded(1e-3, gt=0)
    ceiling_bf16: float = bounded(0.1, gt=0)


@dataclass
class RolloutConfig:
    """Rollout generation (vLLM)."""

    engine: Literal["vllm"] = "vllm"
    # Rollouts per prompt, split evenly over the budgets (n in docs/method.md).
    n_rollouts: int = bounded(16, ge=1)
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_prompt_length: int = bounded(1024, ge=1)
    # L_max of the reward (docs/method.md): the budget prefix does not count toward it.
    max_response_length: int = bounded(L_MAX, ge=1)
    tensor_parallel_size: int = bounded(1, ge=1)
    gpu_memory_utilization: float = bounded(0.5, gt=0, le=1)
    enforce_eager: bool = False
    # The refit hands the engine its weights in buckets of about this size (a full tensor that is
    # larger goes alone): the host/device memory a refit adds is about one bucket plus the largest
    # tensor, not the model (BENCHMARKS.md measures it).
    refit_bucket_mb: int = bounded(256, ge=1)
    refit_check: RefitCheckConfig = field(default_factory=RefitCheckConfig)


@dataclass
class L1Config:
    """L1 / LCPO (docs/baselines.md, "L1"): a target length N in the user turn, drawn once per problem,
    and a reward mixing correctness with length adherence; the authors' settings by default."""

    # Exact mode: R = correct - alpha |N - L|.
    alpha: float = bounded(L1_ALPHA, ge=0)
    # Max mode: R = correct * clip(alpha_max (N - L) + delta, 0, 1).
    alpha_max: float = bounded(L1_ALPHA_MAX, gt=0, hint="the max-mode slope per token")
    delta: float = bounded(L1_DELTA, ge=0, le=1, hint="the max-mode reward at L = N")
    # Targets N are uniform integers in [n_min, n_max], a function of (target_seed, problem text).
    n_min: int = bounded(L1_N_MIN, ge=1)
    n_max: int = bounded(L1_N_MAX, ge=1)
    target_seed: int = 0
    # "exact": every prompt in exact mode (L1-Exact); "max": the dual objective of L1-Max, each problem
    # in max mode with probability max_fraction, else exact.
    stage: Literal["exact", "max"] = L1_STAGE
    max_fraction: float = bounded(L1_MAX_FRACTION, ge=0, le=1)
    # Targets evaluated (length:N in the exact stage, max_length:N in the max stage), for adherence.
    eval_targets: list[int] = bounded(items_gt=0, default_factory=lambda: list(L1_EVAL_TARGETS))


@dataclass
class TLMREConfig:
    """TLMRE (docs/baselines.md, "TLMRE"): correct answers shorter than their prompt's other correct
    answers are paid more; leave-one-out advantage without a std."""

    # R = correct * (1 - alpha * sigmoid(z)); below 1 so that a correct answer always beats a wrong one.
    alpha: float = bounded(TLMRE_ALPHA, ge=0, lt=1)
    std_eps: float = bounded(TLMRE_STD_EPS, gt=0)
    # Whiten all advantages of the rollout batch over every rank (the released code; the paper has none).
    batch_whiten: bool = TLMRE_BATCH_WHITEN


@dataclass
class AdaptThinkConfig:
    """AdaptThink (docs/baselines.md, "AdaptThink"): half of each prompt's rollouts forced to start with
    `</think>` (NoThinking), half with a first word of thinking; A = acc - R_ref(x) + delta 1[NoThinking]."""

    delta: float = bounded(ADAPTTHINK_DELTA, ge=0)
    clip_eps_low: float = bounded(ADAPTTHINK_CLIP_EPS, ge=0, lt=1)
    clip_eps_high: float = bounded(ADAPTTHINK_CLIP_EPS, ge=0)
    nothinking_fraction: float = bounded(ADAPTTHINK_NOTHINKING_FRACTION, gt=0, lt=1,
                                         hint="both modes must be sampled")
    # NoThinking responses' cap, the forced token included; Thinking ones get rollout.max_response_length.
    nothinking_max_response_length: int = bounded(ADAPTTHINK_NOTHINKING_MAX_RESPONSE_LENGTH, ge=2,
                                                  hint="the forced token and one more")
    # The forced first tokens (each must be one token of the policy's tokenizer). Where the chat
    # template does not open the thinking block (the synthetic task), thinking_token is algo.think_open.
    nothinking_token: str = ADAPTTHINK_NOTHINKING_TOKEN
    thinking_token: str = ADAPTTHINK_THINKING_TOKEN
    # R_ref(x): the initial model's accuracy over ref_samples Thinking-mode samples, measured before the
    # first step and kept in <logging.dir>/adaptthink_reference.json. "problem": per training problem
    # (data.train_files); "level": per difficulty level over reference_problems_per_level problems of
    # it (the synthetic task, whose problems are an endless stream).
    ref_samples: int = bounded(ADAPTTHINK_REF_SAMPLES, ge=1)
    reference: Literal["problem", "level"] = "problem"
    reference_problems_per_level: int = bounded(64, ge=1)


@dataclass
class AnytimeConfig:
    """AnytimeReasoner / BRPO (docs/anytime.md): thinking cut at m budgets, A forced summaries per cut, the
    BRPO thinking advantage and the decoupled summary advantage. `preset` names one of the paper's
    configurations (docs/anytime.md, "Named configurations"); it fills the fields it sets unless the recipe
    or an override sets them itself."""

    preset: str | None = None
    thinking_budget: int = bounded(ANYTIME_THINKING_BUDGET, ge=1)  # b_m, max thinking tokens
    n_budgets: int | None = bounded(ANYTIME_N_BUDGETS, ge=1)  # m: b_j = j * b_m / m
    budgets: list[int] | None = None  # or an explicit strictly increasing list ending at b_m
    n_summaries: int = bounded(ANYTIME_N_SUMMARIES, ge=1)  # A per (sample, slot)
    summary_max_tokens: int = bounded(ANYTIME_SUMMARY_MAX_TOKENS, ge=1)
    prior: Literal["base", "uniform", "linear"] = "base"
    variance_reduction: Literal["brpo", "v2only", "v1only", "none"] = "brpo"
    lam: float = bounded(ANYTIME_LAM, gt=0, le=1)
    summary_method: Literal["brpo", "grpo"] = "brpo"
    # The loss: sum over trainable tokens / (rows * loss_normalizer) ("constant", Dr.GRPO), or / tokens.
    loss_normalizer: int = bounded(ANYTIME_LOSS_NORMALIZER, ge=1)
    loss_aggregation: Literal["constant", "token_mean"] = "constant"
    clip_eps: float = bounded(ANYTIME_CLIP_EPS, gt=0, lt=1)
    # The upper clip, when it differs (the paper's 7B run uses DAPO's clip-higher); null: clip_eps.
    clip_eps_high: float | None = bounded(None, gt=0)
    # acc(b) during training (eval.interval, eval.before_after): these budgets, default the training ones.
    eval_budgets: list[int] = bounded(items_gt=0, default_factory=list)


@dataclass
class AlgoConfig:
    """The method and its knobs (docs/method.md, docs/baselines.md); `name` selects it (algo/methods.py)."""

    name: Literal["hbpo", "grpo", "l1_exact", "l1_max", "tlmre", "adaptthink", "anytime"] = "hbpo"
    # Token budgets b_1 < ... < b_k; HBPO only (the other methods use none: []).
    budgets: list[int] = bounded(items_gt=0, default_factory=lambda: list(BUDGETS))
    budget_template: str = BUDGET_TEMPLATE
    think_open: str = THINK_OPEN
    think_close: str = THINK_CLOSE
    beta: float = bounded(BETA, gt=0)
    alpha: float = bounded(ALPHA, ge=0)
    # Reward for a response with no `</think>` or no extractable answer (truncations land here).
    format_error_reward: float = 0.0
    w_intra: float = bounded(1.0, ge=0)
    # Subtract the prompt's mean intra-budget term (our addition, docs/method.md; paper = false).
    center_intra: bool = False
    adv_eps: float = bounded(ADV_EPS, gt=0)
    clip_eps_low: float = bounded(CLIP_EPS_LOW, ge=0, lt=1)
    clip_eps_high: float = bounded(CLIP_EPS_HIGH, ge=0)
    # null: no dual clip (the verl / OpenRLHF losses of L1 and TLMRE, docs/baselines.md).
    dual_clip_c: float | None = bounded(DUAL_CLIP_C, gt=1, hint="it bounds -A*rho from above; null turns it off")
    # A KL term needs a reference model's log-probs, which the trainer does not compute yet: 0 only.
    kl_coef: float = bounded(0.0, ge=0, le=0, hint="the trainer keeps no reference model yet")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Truncated importance sampling against the rollout engine's log-probs: weight each token by
    # min(pi_train_old / pi_rollout, tis_cap); null = off (the engines agree to ~1e-6 in fp32).
    tis_cap: float | None = bounded(None, gt=0)
    # The baselines' settings (docs/baselines.md); read only by the method that `name` selects.
    l1: L1Config = field(default_factory=L1Config)
    tlmre: TLMREConfig = field(default_factory=TLMREConfig)
    adaptthink: AdaptThinkConfig = field(default_factory=AdaptThinkConfig)
    anytime: AnytimeConfig = field(default_factory=AnytimeConfig)


@dataclass
class VerifierConfig:
    """Answer checking with math-verify in worker processes."""

    num_workers: int = bounded(2, ge=1)
    # Wall-clock seconds one answer may take before it is scored incorrect and its worker replaced.
    timeout_s: float = bounded(5.0, gt=0)


@dataclass
class TrainConfig:
    """The outer loop: rollout batches and the optimizer steps taken on each."""

    prompts_per_step: int = bounded(64, ge=1)
    # Prompts per optimizer step: prompts_per_step / mini_batch_prompts optimizer steps per batch.
    mini_batch_prompts: int = bounded(16, ge=1)
    total_steps: int = bounded(629, ge=1)
    # Sequence-packing budget of one micro-batch, in tokens (prompt + response) per rank.
    micro_batch_tokens: int = bounded(16384, ge=1)
    seed: int = 1234


@dataclass
class OptimizerConfig:
    name: Literal["adam"] = "adam"
    lr: float = bounded(1e-6, gt=0)
    min_lr: float = bounded(0.0, ge=0)
    weight_decay: float = bounded(0.01, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.999, ge=0, lt=1)
    adam_eps: float = bounded(1e-8, gt=0)
    clip_grad: float = bounded(1.0, ge=0, hint="0 disables clipping")
    lr_schedule: Literal["constant", "warmup_constant", "cosine"] = "constant"
    lr_warmup_steps: int = bounded(0, ge=0)
    use_distributed_optimizer: bool = True


@dataclass
class DataConfig:
    """Prompt datasets (jsonl or parquet rows with `problem` and `answer`)."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    problem_key: str = "problem"
    answer_key: str = "answer"
    # User turn; `{problem}` is replaced by the row's problem, other braces stay as written
    # (DeepScaleR's instruction by default).
    prompt_template: str = PROMPT_TEMPLATE
    system_prompt: str | None = None
    shuffle: bool = True
    # Skip (and count) rows with a missing field or empty answer instead of failing on them.
    skip_bad_rows: bool = False
    # "files": train_files; "synthetic": the embedded graded task (megatron_hbpo/data/synthetic.py),
    # generated in code with its own word-level tokenizer (the recipe's model then needs no hf_path).
    source: Literal["files", "synthetic"] = "files"
    # Difficulty levels of the synthetic task (level l = l additions).
    synthetic_levels: list[int] = bounded(items_gt=0, default_factory=lambda: [1, 2, 3, 4])


@dataclass
class WarmupConfig:
    """Supervised warm-up in the same Megatron stack before RL (the synthetic task's base model).

    The responses follow `style_mix` whatever the problem's difficulty or the budget in the prompt:
    an "over-thinking" base model that mostly writes verbose chains and ignores budgets.
    """

    steps: int = bounded(0, ge=0)  # 0: no warm-up (a pretrained hf_path is the base)
    sequences_per_step: int = bounded(64, ge=1)
    # Defaults: the settings measured in README.md (recipes/tiny_cpu.yaml).
    lr: float = bounded(2.0e-3, gt=0)
    min_lr: float = bounded(2.0e-4, gt=0)
    # Weight decay helps a small model past its plateau on the arithmetic (grokking-style).
    weight_decay: float = bounded(0.1, ge=0)
    # Shares of the response styles (data/synthetic.py: concise, steps, checked, verbose).
    style_mix: dict = field(default_factory=lambda: {"verbose": 0.8, "checked": 0.05, "steps": 0.05,
                                                     "concise": 0.1})
    # Chance that an addition's first result is wrong (caught by the checks in checked/verbose).
    error_rate: float = bounded(0.1, ge=0, lt=1)
    # Share of warm-up prompts that carry a random budget prefix (so the base has seen the sentence),
    # drawn from prompt_budgets (empty: algo.budgets). A GRPO baseline names HBPO's budgets here so
    # that both start from the same base.
    budget_prompt_fraction: float = bounded(0.5, ge=0, le=1)
    prompt_budgets: list[int] = field(default_factory=list)
    # Where the warm-up weights are kept; recipes that share a base (HBPO and its GRPO baseline)
    # point to the same directory and the second one reuses it.
    # AnytimeReasoner's recipes (algo.name anytime): every answer follows the forced "**Final Answer**" insert,
    # and this share of the examples stops its thinking at a random token, inserts the truncation marker and
    # answers anyway (docs/anytime.md, "CPU demonstration"); the inserted tokens are context, not targets.
    summary_cut_fraction: float = bounded(0.0, ge=0, le=1)
    dir: str | None = None
    seed: int = 4321             # the warm-up's data
    # The base's random initialisation, before the warm-up (not train.seed: every RL seed of a comparison
    # starts from the same base). 1234: the bases measured in README.md and BENCHMARKS.md.
    init_seed: int = 1234
    # A base built ahead by this warm-up code (`make warmup-base`; recipes/tiny_cpu.yaml ships one in assets/):
    # used when its fingerprint equals this recipe's warm-up, code included; otherwise the warm-up trains into
    # `dir` as without it. null: always train (the full path).
    prebuilt: str | None = None


@dataclass
class EvalConfig:
    """Evaluation by level and prompt mode (natural, each budget) before and after training."""

    # Evaluate the base before training and the policy after it, and write summary.json + plot.
    before_after: bool = False
    # Also every N training steps (0: never), logged with the training metrics.
    interval: int = bounded(0, ge=0)
    problems_per_level: int = bounded(64, ge=1)
    samples_per_problem: int = bounded(1, ge=1)
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    seed: int = 2718
    # Prompt modes evaluated besides the method's own (e.g. HBPO's budget:N for a baseline, as a control).
    modes: list[str] = field(default_factory=list)
    # Budget adherence: a response more than this many tokens over its target is a soft violation
    # (L1's 500 at L_max 4096; scale it with the task's lengths).
    adherence_soft_margin: int = bounded(ADHERENCE_SOFT_MARGIN, ge=0)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    save_interval: int = bounded(50, ge=1)
    keep_last: int = bounded(3, ge=1)
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
    def rollout_layout(self) -> RolloutLayout:
        """Which ranks generate together and which prompts each replica generates (rollout/layout.py)."""
        c = self.cluster
        return rollout_layout(c.world_size, self.rollout.tensor_parallel_size, self.train.prompts_per_step,
                              gpus_per_node=c.gpus_per_node)

    @property
    def tree_rows(self) -> bool:
        """Whether the method trains on packed tree rows with two-phase rollouts (AnytimeReasoner)."""
        return self.algo.name == "anytime"

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
        nearby = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, nearby, n=1)
        hint = f"; did you mean {path.parent / close[0]}?" if close else (
            f"; recipes there: {', '.join(nearby)}" if nearby else "")
        raise ConfigError(f"{path}: recipe file not found{hint}")
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
        return _build(typing.cast(type, tp), value, where)
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


def _check_bounds(value: Any, bounds: dict | None, where: str) -> None:
    if not bounds or value is None:
        return
    hint = f" ({bounds['hint']})" if bounds["hint"] else ""
    if bounds["items_gt"] is not None:
        bad = [v for v in value if not v > bounds["items_gt"]]
        if bad:
            raise ConfigError(f"{where}: every item must be > {bounds['items_gt']}, got {value}{hint}")
        return
    low = ("ge", bounds["ge"]) if bounds["ge"] is not None else ("gt", bounds["gt"])
    high = ("le", bounds["le"]) if bounds["le"] is not None else ("lt", bounds["lt"])
    ok = math.isfinite(value)
    if low[1] is not None:
        ok = ok and (value >= low[1] if low[0] == "ge" else value > low[1])
    if high[1] is not None:
        ok = ok and (value <= high[1] if high[0] == "le" else value < high[1])
    if not ok:
        if low[1] is not None and high[1] is not None:
            interval = f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
        elif low[1] is not None:
            interval = f"{'>=' if low[0] == 'ge' else '>'} {low[1]}"
        else:
            interval = f"{'<=' if high[0] == 'le' else '<'} {high[1]}"
        raise ConfigError(f"{where}: must be {interval}, got {value}{hint}")


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
            _check_bounds(kwargs[name], f.metadata.get("bounds"), where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required field is missing; set it in the recipe")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Validation: cross-field rules, before any process group starts
# --------------------------------------------------------------------------------------------------


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _validate_baseline(recipe: Recipe) -> None:
    """The cross-field rules of the method `algo.name` selects (docs/baselines.md, "Settings")."""
    a, r, d = recipe.algo, recipe.rollout, recipe.data
    if a.name in ("l1_exact", "l1_max"):
        l1 = a.l1
        _check(l1.stage == ("exact" if a.name == "l1_exact" else "max"), "algo.l1.stage",
               f"{a.name} trains the {a.name[3:]} stage; set algo.l1.stage={a.name[3:]} (got {l1.stage})")
        _check(l1.n_min <= l1.n_max, "algo.l1.n_max", f"must be >= algo.l1.n_min={l1.n_min}, got {l1.n_max}")
        _check(l1.n_max <= r.max_response_length, "algo.l1.n_max",
               f"{l1.n_max} exceeds rollout.max_response_length={r.max_response_length}; a longer target could "
               "never be met: lower it or raise the response length")
        _check(bool(l1.eval_targets), "algo.l1.eval_targets", "needs at least one target, e.g. [512, 1024, 2048]")
    elif a.name == "tlmre":
        _check(r.n_rollouts >= 2, "rollout.n_rollouts",
               f"TLMRE's leave-one-out baseline needs >= 2 rollouts per prompt, got {r.n_rollouts}")
    elif a.name == "adaptthink":
        at = a.adaptthink
        n_nothinking = round(r.n_rollouts * at.nothinking_fraction)
        _check(0 < n_nothinking < r.n_rollouts, "rollout.n_rollouts",
               f"{r.n_rollouts} rollouts split by algo.adaptthink.nothinking_fraction={at.nothinking_fraction} "
               "leave a mode without samples; use an even number >= 2")
        _check(at.nothinking_max_response_length <= r.max_response_length,
               "algo.adaptthink.nothinking_max_response_length",
               f"{at.nothinking_max_response_length} exceeds rollout.max_response_length={r.max_response_length}")
        _check(bool(at.nothinking_token) and bool(at.thinking_token) and at.nothinking_token != at.thinking_token,
               "algo.adaptthink.thinking_token", f"the two forced tokens must be non-empty and differ, got "
               f"nothinking_token={at.nothinking_token!r}, thinking_token={at.thinking_token!r}")
        _check(d.source == "files" or at.reference == "level", "algo.adaptthink.reference",
               "the synthetic task's problems are an endless stream with no fixed set to measure per problem; "
               "set algo.adaptthink.reference=level")
        _check(a.tis_cap is None, "algo.tis_cap", "AdaptThink's sequence-ratio loss has no truncated importance "
               "sampling (docs/baselines.md); set algo.tis_cap=null")
    elif a.name == "anytime":
        _validate_anytime(recipe)


def anytime_budgets(c: AnytimeConfig) -> list[int]:
    """The budget support b_1 < ... < b_m of algo.anytime (the same rule as algo/anytime.training_budgets,
    torch-free for the launcher's environment); ConfigError naming the field."""
    f = "algo.anytime."
    if c.budgets is not None:
        b = list(c.budgets)
        _check(bool(b) and b[0] >= 1 and all(x < y for x, y in zip(b, b[1:])), f + "budgets",
               f"must be positive and strictly increasing, got {b}")
        _check(b[-1] == c.thinking_budget, f + "budgets",
               f"the last budget {b[-1]} must equal {f}thinking_budget={c.thinking_budget}")
        _check(c.n_budgets is None or c.n_budgets == len(b), f + "n_budgets",
               f"{c.n_budgets} does not match the {len(b)} budgets {b}; set it to {len(b)} or null")
        return b
    _check(c.n_budgets is not None, f + "n_budgets", "set it (m) or list algo.anytime.budgets")
    assert c.n_budgets is not None
    _check(c.thinking_budget % c.n_budgets == 0, f + "n_budgets",
           f"{c.n_budgets} does not divide {f}thinking_budget={c.thinking_budget}; choose a divisor or list "
           f"{f}budgets explicitly")
    step = c.thinking_budget // c.n_budgets
    return [step * j for j in range(1, c.n_budgets + 1)]


def _validate_anytime(recipe: Recipe) -> None:
    """docs/anytime.md, "Configuration" (the checks of algo/anytime.check_config, torch-free)."""
    a, r, m, c = recipe.algo, recipe.rollout, recipe.model, recipe.algo.anytime
    f = "algo.anytime."
    _check(r.n_rollouts >= 2, "rollout.n_rollouts",
           f"BRPO compares a prompt's thinking samples and needs G >= 2, got {r.n_rollouts}")
    budgets = anytime_budgets(c)
    _check(not (c.summary_method == "grpo" and c.n_summaries != 1), f + "n_summaries",
           f"summary_method=grpo requires n_summaries=1, got {c.n_summaries}")
    need = budgets[-1] + len(budgets) * c.n_summaries * (c.summary_max_tokens + ANYTIME_INSERT_ALLOWANCE)
    _check(r.max_response_length >= need, "rollout.max_response_length",
           f"{r.max_response_length} cannot hold b_m={budgets[-1]} thinking tokens plus {len(budgets)}x"
           f"{c.n_summaries} summaries of {c.summary_max_tokens}+{ANYTIME_INSERT_ALLOWANCE} tokens = {need}; raise it "
           f"or lower {f}n_summaries / {f}summary_max_tokens")
    _check(m.attention_backend != "te", "model.attention_backend",
           "the anytime rows need a tree attention mask, which te does not apply; use sdpa (or unfused)")
    _check(not (m.attention_backend == "auto" and m.transformer_impl == "transformer_engine"),
           "model.attention_backend", "auto means te with Transformer Engine layers, which cannot apply the anytime "
           "rows' tree mask; set it to sdpa")
    _check(recipe.parallel.context_parallel_size == 1, "parallel.context_parallel_size",
           "the anytime rows are not split over context-parallel ranks; set it to 1")
    _check(a.tis_cap is None, "algo.tis_cap", "the anytime loss has no truncated importance sampling; set it to null")
    _check(a.think_close == "</think>", "algo.think_close",
           f"the forced summaries close the thinking with `</think>` (docs/anytime.md); got {a.think_close!r}")
    for i, b in enumerate(c.eval_budgets):
        _check(b <= budgets[-1], f"{f}eval_budgets[{i}]", f"{b} exceeds {f}thinking_budget={budgets[-1]}")


def resolve_presets(raw: dict) -> dict:
    """algo.anytime.preset filled in: the preset's fields (docs/anytime.md, "Named configurations") where the
    recipe and its overrides leave them unset. A copy; an unknown preset is a ConfigError."""
    section = raw.get("algo", {}).get("anytime") if isinstance(raw.get("algo"), dict) else None
    if not isinstance(section, dict) or section.get("preset") is None:
        return raw
    name = section["preset"]
    if name not in ANYTIME_PRESETS:
        hint = difflib.get_close_matches(str(name), list(ANYTIME_PRESETS), n=1)
        raise ConfigError(f"algo.anytime.preset: unknown {name!r}; choose one of {', '.join(ANYTIME_PRESETS)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    filled = {**ANYTIME_PRESETS[name], **section}
    return _deep_merge(raw, {"algo": {"anytime": filled}})


def validate(recipe: Recipe, world_size: int | None = None) -> Recipe:
    """Raise ConfigError on the first inconsistency. `world_size`: the launched job's (WORLD_SIZE)."""
    m, p, c, r, a = recipe.model, recipe.parallel, recipe.cluster, recipe.rollout, recipe.algo
    t, o = recipe.train, recipe.optimizer

    _check(m.num_attention_heads % m.num_query_groups == 0, "model.num_query_groups",
           f"{m.num_query_groups} does not divide num_attention_heads={m.num_attention_heads} (GQA groups "
           "must split the heads evenly)")
    if m.kv_channels is None:
        _check(m.hidden_size % m.num_attention_heads == 0, "model.kv_channels",
               f"hidden_size={m.hidden_size} is not a multiple of num_attention_heads="
               f"{m.num_attention_heads}; set kv_channels (the head dimension) explicitly")
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

    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    _check(m.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
           f"{tp} does not divide model.num_attention_heads={m.num_attention_heads}; pick a divisor")
    _check(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size",
           f"{tp} does not divide model.num_query_groups={m.num_query_groups}; pick a divisor")
    _check(m.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
           f"{pp} does not divide model.num_layers={m.num_layers}; pick a divisor")
    _check(not (p.sequence_parallel and tp == 1), "parallel.sequence_parallel",
           "needs tensor_model_parallel_size > 1; set it to false")

    if world_size is not None:
        _check(world_size == c.world_size, "cluster.gpus_per_node",
               f"the recipe describes {c.nodes} node(s) x {c.gpus_per_node} = {c.world_size} processes but "
               f"the job was launched with WORLD_SIZE={world_size}; set cluster.nodes/cluster.gpus_per_node "
               f"to match the launch (e.g. cluster.gpus_per_node={max(1, world_size // c.nodes)}) or launch "
               f"{c.world_size} process(es) (torchrun --nproc-per-node {c.gpus_per_node})")
    _check(c.world_size % (tp * pp * cp) == 0, "parallel",
           f"tensor ({tp}) x pipeline ({pp}) x context ({cp}) = {tp * pp * cp} does not divide the world "
           f"size {c.world_size} (cluster.nodes x cluster.gpus_per_node)")
    dp = recipe.data_parallel_size

    context = r.max_prompt_length + r.max_response_length
    _check(context <= m.max_position_embeddings, "rollout.max_response_length",
           f"max_prompt_length + max_response_length = {context} exceeds the model's context "
           f"model.max_position_embeddings={m.max_position_embeddings}; shorten them")
    try:
        recipe.rollout_layout  # noqa: B018 (validates T against the node, the world and the step's prompts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(m.num_attention_heads % r.tensor_parallel_size == 0, "rollout.tensor_parallel_size",
           f"{r.tensor_parallel_size} does not divide model.num_attention_heads={m.num_attention_heads}")

    if a.name != "hbpo":
        _check(not a.budgets, "algo.budgets",
               f"{a.name} samples without HBPO's budget subgroups; set algo.budgets=[] (got {a.budgets})")
    else:
        k = len(a.budgets)
        _check(k >= 1, "algo.budgets", "HBPO needs at least one budget, e.g. [512, 1024, 2048, 2560]")
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
    _check(all(math.isfinite(x) for x in (a.beta, a.alpha, a.format_error_reward, a.w_intra)), "algo",
           "beta, alpha, format_error_reward and w_intra must be finite numbers")
    _validate_baseline(recipe)


    _check(t.prompts_per_step % t.mini_batch_prompts == 0, "train.mini_batch_prompts",
           f"{t.mini_batch_prompts} does not divide train.prompts_per_step={t.prompts_per_step}")
    _check(t.mini_batch_prompts % dp == 0, "train.mini_batch_prompts",
           f"{t.mini_batch_prompts} prompts cannot be shared evenly by {dp} data-parallel ranks; "
           f"use a multiple of {dp}")
    _check(t.micro_batch_tokens >= context, "train.micro_batch_tokens",
           f"{t.micro_batch_tokens} cannot hold one full sequence of {context} tokens "
           "(max_prompt_length + max_response_length); raise it")

    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, lr], got {o.min_lr}")

    _check("{problem}" in recipe.data.prompt_template, "data.prompt_template",
           "must contain '{problem}'")
    d, w, ev = recipe.data, recipe.warmup, recipe.eval
    if d.source == "synthetic":
        _check(bool(d.synthetic_levels), "data.synthetic_levels", "needs at least one level, e.g. [1, 2, 3, 4]")
        _check(m.hf_path is None, "model.hf_path", "the synthetic task brings its own tokenizer and a random-init "
               "model; set model.hf_path to null or data.source to files")
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
    if ev.before_after or ev.interval:
        _check(d.source == "synthetic" or bool(d.eval_files), "eval", "evaluation needs data.eval_files "
               "(or the synthetic task)")
    for i, mode in enumerate(ev.modes):
        try:
            parse_mode(mode)
        except ValueError as e:
            raise ConfigError(f"eval.modes[{i}]: {e}") from None
    return recipe


def build_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return _build(Recipe, resolve_presets(raw), "")
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
