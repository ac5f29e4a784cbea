"""Fit planner: will a recipe fit its GPUs, and what does a step cost?

    python -m megatron_hbpo.plan --config recipes/r1_distill_qwen_7b.yaml [dotted.overrides]

A CPU recipe (cluster.gpu: cpu) gets a host-memory plan instead (host_plan.py).

Per GPU, for the pipeline stage that holds the most (the first or the last), in GiB:
  weights     params of the stage / TP, at the params dtype (+1 byte per FP8 GEMM weight for its cast)
  grads       Megatron DDP's fp32 gradient buffer: 4 bytes per param
  optimizer   fp32 master weights + Adam m and v: 12 bytes per bf16 param (8 for fp32 params),
              divided by DP with the distributed optimizer
  activations one micro-batch of `train.micro_batch_tokens` tokens per layer of the stage, times the
              PP micro-batches 1F1B keeps in flight; bf16 bytes per token and layer for a SwiGLU block
              with flash attention: 12 h + 4 g d + 6 f (h hidden, g KV heads, d head dim, f ffn), split
              over TP (the 8 h of norm inputs/outputs only with sequence parallelism), plus 6 a s
              (a heads, s sequence length) with model.attention_backend unfused unless its core
              attention is recomputed ("selective"); "full" recompute keeps 2 h per layer plus one
              layer's working set
  logits      last stage: tokens x padded vocab / TP x 10 bytes (bf16 output, fp32 copy, fp32 exp)
  tree mask   the anytime method's packed rows (docs/anytime.md): one [rows, 1, s, s] boolean mask per
              micro-batch, s = max_prompt_length + max_response_length, rows = micro_batch_tokens // s (at
              least 1), plus the SDPA kernel's additive copy in the params dtype: 3 bytes per pair
  vLLM        the colocated engine's share, gpu_memory_utilization x GPU memory, while it is awake
Two phases must each fit in 95% of the GPU: training (weights + grads + optimizer + activations +
logits + 2 GiB runtime) with vLLM asleep (level 2: weights and KV cache freed; the refit reloads
them), and rollout (weights + grads + optimizer + vLLM share). The rollout layout is the trainer's
(rollout/layout.py): world / T replicas of T = rollout.tensor_parallel_size GPUs, each holding the
model's weights / T (bf16) and a KV cache with the model's KV heads split over T; the share must hold
the weights and at least one prompt + response, and the report says how many of a replica's sequences
(its prompts x rollouts) its KV cache holds at once. Step FLOPs count matmuls: 2 N per generated or
scored token, 6 N per trained token, plus attention. Written by hand (Megatron has no planner
for a colocated RL step); the formulas are the usual ones (Korthikanti et al. 2022 for activations)
adapted to SwiGLU, GQA and flash attention.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from megatron_hbpo.algo.constants import ANYTIME_INSERT_ALLOWANCE
from megatron_hbpo.config import ConfigError, Recipe, load_recipe

GIB = 2**30
GPU_MEMORY_GIB = {"H100-80GB": 79.6, "H200-141GB": 140.4}
USABLE = 0.95
RUNTIME_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack


@dataclass
class Plan:
    recipe: str
    gpu: str
    gpu_gib: float
    params_total: int
    params_per_gpu: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    vllm_gib: float
    vllm_weights_gib: float
    kv_cache_tokens: int
    rollout_replicas: int
    sequences_per_replica: int
    concurrent_sequences: int
    train_gib: float
    rollout_gib: float
    step_tflops: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def _padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    from math import lcm

    multiple = lcm(divisible_by, tp)
    return -(-vocab // multiple) * multiple


def layer_params(recipe: Recipe) -> int:
    m = recipe.model
    d, heads, groups = recipe.head_dim, m.num_attention_heads, m.num_query_groups
    qkv_out = (heads + 2 * groups) * d
    attention = m.hidden_size * qkv_out + (qkv_out if m.add_qkv_bias else 0) + heads * d * m.hidden_size
    return attention + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size


def plan(recipe: Recipe) -> Plan:
    m, p, r, t = recipe.model, recipe.parallel, recipe.rollout, recipe.train
    gpu = recipe.cluster.gpu
    if gpu not in GPU_MEMORY_GIB:
        raise ConfigError(f"cluster.gpu: the planner sizes GPUs {sorted(GPU_MEMORY_GIB)}, got {gpu!r}")
    tp, pp, cp, dp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                      recipe.data_parallel_size)
    h, f, layers, d, groups = m.hidden_size, m.ffn_hidden_size, m.num_layers, recipe.head_dim, m.num_query_groups
    vocab = _padded_vocab(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    per_layer = layer_params(recipe)
    embedding = vocab * h
    total = layers * per_layer + embedding * (1 if m.tie_word_embeddings else 2) + h

    stage_layers = layers // pp
    output_layer = 0 if pp > 1 or m.tie_word_embeddings else embedding // tp
    first = stage_layers * per_layer // tp + embedding // tp + output_layer
    last = stage_layers * per_layer // tp + embedding // tp + h
    per_gpu = max(first, last) if pp > 1 else first + h
    bf16 = m.params_dtype == "bf16"
    weight_bytes = (2 if bf16 else 4) + (1 if m.fp8 else 0)
    optimizer_bytes = 12 if bf16 else 8
    optimizer_shards = dp * cp if recipe.optimizer.use_distributed_optimizer else 1
    weights = per_gpu * weight_bytes / GIB
    grads = per_gpu * 4 / GIB
    optimizer = per_gpu * optimizer_bytes / optimizer_shards / GIB

    tokens = t.micro_batch_tokens / cp
    replicated, split = 8 * h, 4 * h + 4 * groups * d + 6 * f  # bytes per token and layer (bf16)
    if m.attention_backend == "unfused" and p.recompute_granularity != "selective":
        # Unfused attention keeps each layer's softmax output (fp32) and probabilities (bf16): 6 bytes
        # per query-key pair and head, s pairs per token.
        split += 6 * m.num_attention_heads * min(t.micro_batch_tokens, r.max_prompt_length + r.max_response_length)
    per_token_layer = (replicated + split) / tp if p.sequence_parallel else replicated + split / tp
    in_flight = pp  # 1F1B: the first stage holds pp micro-batches' activations
    if p.recompute_granularity == "full":
        stored = 2 * h / (tp if p.sequence_parallel else 1)
        activations = tokens * (stored * stage_layers * in_flight + per_token_layer) / GIB
    else:
        activations = tokens * per_token_layer * stage_layers * in_flight / GIB
    logits = tokens * vocab / tp * 10 / GIB
    row = r.max_prompt_length + r.max_response_length
    if recipe.tree_rows:  # one tree mask per micro-batch, shared by every layer
        activations += max(1, t.micro_batch_tokens // row) * row * row * 3 / GIB

    gpu_gib = GPU_MEMORY_GIB[gpu]
    usable = gpu_gib * USABLE
    vllm = r.gpu_memory_utilization * gpu_gib
    vllm_weights = total * 2 / r.tensor_parallel_size / GIB
    kv_heads_per_rank = max(1, groups // r.tensor_parallel_size)
    kv_bytes_per_token = 2 * layers * kv_heads_per_rank * d * 2
    kv_tokens = max(0, int((vllm - vllm_weights - 1.0) * GIB / kv_bytes_per_token))
    layout = recipe.rollout_layout
    sequences_per_replica = layout.prompts_per_replica * r.n_rollouts
    concurrent = min(sequences_per_replica, kv_tokens // (r.max_prompt_length + r.max_response_length))
    static = weights + grads + optimizer
    train = static + activations + logits + RUNTIME_OVERHEAD_GIB
    rollout = static + vllm + RUNTIME_OVERHEAD_GIB

    problems = []
    if train > usable:
        biggest = max(("weights", weights), ("optimizer", optimizer), ("activations", activations),
                      ("logits", logits), key=lambda kv: kv[1])[0]
        fix = {
            "weights": "raise parallel.tensor_model_parallel_size or parallel.pipeline_model_parallel_size",
            "optimizer": ("set optimizer.use_distributed_optimizer=true"
                          if not recipe.optimizer.use_distributed_optimizer
                          else "raise parallel.pipeline_model_parallel_size or the number of GPUs (more DP shards)"),
            "activations": ("set parallel.recompute_granularity=full" if p.recompute_granularity != "full"
                            else "lower train.micro_batch_tokens or raise parallel.pipeline_model_parallel_size"),
            "logits": "lower train.micro_batch_tokens or raise parallel.tensor_model_parallel_size",
        }[biggest]
        problems.append(f"training needs {train:.1f} GiB of {usable:.1f} usable ({biggest} is the largest part); {fix}")
    if rollout > usable:
        problems.append(f"rollout needs {rollout:.1f} GiB of {usable:.1f} usable (Megatron's {static:.1f} GiB stay "
                        f"while vLLM holds {vllm:.1f}); lower rollout.gpu_memory_utilization")
    if kv_tokens < r.max_prompt_length + r.max_response_length:
        problems.append(f"vLLM's share ({vllm:.1f} GiB) holds its weights ({vllm_weights:.1f} GiB) but KV cache for "
                        f"only {kv_tokens} tokens, less than one {r.max_prompt_length + r.max_response_length}-token "
                        "sequence; raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size")

    # FLOPs of one step (the whole job), matmuls only, attention included at the mean sequence length.
    budgets = recipe.algo.budgets or [r.max_response_length // 2]
    response = sum(min(b, r.max_response_length) for b in budgets) / len(budgets)
    generated = response
    if recipe.tree_rows:  # a row: half the thinking budget on average, then m * A summaries with their inserts
        from megatron_hbpo.config import anytime_budgets

        c = recipe.algo.anytime
        branches = len(anytime_budgets(c)) * c.n_summaries
        response = c.thinking_budget / 2 + branches * (c.summary_max_tokens + ANYTIME_INSERT_ALLOWANCE)
        generated = c.thinking_budget / 2 + branches * c.summary_max_tokens  # the prefix cache serves the rest
    prompt = r.max_prompt_length / 2
    samples = t.prompts_per_step * r.n_rollouts
    seq = prompt + response
    matmul = total - embedding  # the input embedding is a lookup
    attention_per_token = 2 * 2 * layers * m.num_attention_heads * d * seq / 2
    forward_per_token = 2 * matmul + attention_per_token
    step = {
        "rollout": samples * generated * forward_per_token / 1e12,
        "logp_old": samples * seq * forward_per_token / 1e12,
        "train": samples * seq * 3 * forward_per_token / 1e12,
    }
    step["total"] = sum(step.values())
    return Plan(recipe=recipe.name, gpu=gpu, gpu_gib=gpu_gib, params_total=total, params_per_gpu=per_gpu,
                weights_gib=weights, grads_gib=grads, optimizer_gib=optimizer, activations_gib=activations,
                logits_gib=logits, vllm_gib=vllm, vllm_weights_gib=vllm_weights, kv_cache_tokens=kv_tokens,
                rollout_replicas=layout.replicas, sequences_per_replica=sequences_per_replica,
                concurrent_sequences=concurrent,
                train_gib=train, rollout_gib=rollout, step_tflops=step, problems=problems)


def report(result: Plan, recipe: Recipe) -> str:
    p = recipe.parallel
    lines = [
        f"{result.recipe}: {result.params_total / 1e9:.2f}B params on {recipe.cluster.nodes} x "
        f"{recipe.cluster.gpus_per_node} {result.gpu} (TP {p.tensor_model_parallel_size}, PP "
        f"{p.pipeline_model_parallel_size}, CP {p.context_parallel_size}, DP {recipe.data_parallel_size}; vLLM TP "
        f"{recipe.rollout.tensor_parallel_size})",
        f"  per GPU: {result.params_per_gpu / 1e6:.0f}M params; weights {result.weights_gib:.1f} GiB, grads "
        f"{result.grads_gib:.1f}, optimizer {result.optimizer_gib:.1f}, activations {result.activations_gib:.1f}, "
        f"logits {result.logits_gib:.1f}",
        f"  training phase {result.train_gib:.1f} GiB, rollout phase {result.rollout_gib:.1f} GiB "
        f"(vLLM share {result.vllm_gib:.1f}: weights {result.vllm_weights_gib:.1f}, KV cache "
        f"{result.kv_cache_tokens:,} tokens) of {result.gpu_gib:.1f} GiB",
        f"  rollout: {recipe.rollout_layout.describe()}; a replica's KV cache holds {result.concurrent_sequences} of "
        f"its {result.sequences_per_replica} sequences at full length at once",
        "  step: " + ", ".join(f"{k} {v:,.0f} TFLOP" for k, v in result.step_tflops.items()),
    ]
    lines += [f"  DOES NOT FIT: {problem}" for problem in result.problems] or ["  fits"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that a recipe fits its GPUs; print memory and FLOPs.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        if recipe.cluster.gpu == "cpu":
            from megatron_hbpo import host_plan

            host = host_plan.host_plan(recipe)
            print(host_plan.report(host, recipe))
            return 0 if host.fits else 1
        result = plan(recipe)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(report(result, recipe))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
