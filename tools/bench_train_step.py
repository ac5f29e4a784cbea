"""Time the Megatron HBPO step (logp_old pass + forward/backward + optimizer) for a recipe's shape.

    python tools/bench_train_step.py --config recipes/tiny_cpu.yaml [--sequences 32] [--steps 5] [overrides]
    torchrun --nproc-per-node 8 tools/bench_train_step.py --config recipes/X.yaml ...

Random weights and random token sequences whose response lengths spread like HBPO's budget
subgroups (uniform in [budget / 4, budget] for each budget, L_max for GRPO). Prints tokens/s of
the update and of the logp pass, the padding fraction of the dynamic micro-batches, peak memory,
and on GPU the model FLOPs utilisation (MFU) against the device's peak bf16 dense FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

from megatron_hbpo import runtime
from megatron_hbpo.algo.methods import method_for
from megatron_hbpo.config import load_recipe
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.model import hf_config_from_recipe
from megatron_hbpo.megatron.train_step import MegatronPolicy

# Dense bf16 peak per GPU, FLOP/s (NVIDIA datasheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def model_flops_per_sequence(recipe, length: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one sequence, counting matmuls only."""
    m = recipe.model
    head_dim = recipe.head_dim
    qkv = m.hidden_size * head_dim * (m.num_attention_heads + 2 * m.num_query_groups)
    proj = m.num_attention_heads * head_dim * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    per_token_layer = 2 * (qkv + proj + mlp)
    attention = 2 * 2 * length * m.num_attention_heads * head_dim / 2  # QK^T and AV, causal half
    logits = 2 * m.hidden_size * m.vocab_size
    forward = length * (m.num_layers * (per_token_layer + attention) + logits)
    return 3 * forward


def make_sequences(recipe, count: int, rank_seed: int) -> list[PolicySequence]:
    g = torch.Generator().manual_seed(rank_seed)
    budgets = recipe.algo.budgets or [recipe.rollout.max_response_length]
    prompt = min(recipe.rollout.max_prompt_length, 256)
    sequences = []
    for i in range(count):
        budget = budgets[i % len(budgets)]
        response = int(torch.randint(max(1, budget // 4), budget + 1, (1,), generator=g))
        tokens = torch.randint(0, recipe.model.vocab_size, (prompt + response,), generator=g).tolist()
        sequences.append(PolicySequence(tokens, prompt, advantage=float(torch.randn(1, generator=g))))
    return sequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--sequences", type=int, default=32, help="sequences per optimizer step and rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = load_recipe(args.config, args.overrides + ["cluster.nodes=1", f"cluster.gpus_per_node={world}"],
                         world_size=world)
    runtime.configure()
    parallel.initialize(recipe.parallel, recipe.train.seed)
    t = recipe.train
    policy = MegatronPolicy(hf_config_from_recipe(recipe.model), recipe.model, recipe.parallel, recipe.optimizer,
                            micro_batch_tokens=t.micro_batch_tokens,
                            optimizer_steps=t.total_steps * (t.prompts_per_step // t.mini_batch_prompts))
    method = method_for(recipe.algo, l_max=recipe.rollout.max_response_length, temperature=recipe.rollout.temperature)
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    sequences = make_sequences(recipe, args.sequences, rank_seed=dp_rank)
    tokens = sum(len(s.tokens) for s in sequences)
    flops = sum(model_flops_per_sequence(recipe, len(s.tokens)) for s in sequences)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    logp_seconds, step_seconds, padding = 0.0, 0.0, 0.0
    for step in range(args.steps + 1):
        sync()
        start = time.perf_counter()
        for seq, logp in zip(sequences, policy.logprobs(sequences, temperature=recipe.rollout.temperature)):
            seq.logp_old = logp
        sync()
        middle = time.perf_counter()
        metrics = policy.train_step(sequences, method.loss())
        sync()
        end = time.perf_counter()
        if step:  # the first step pays for allocation and warm-up
            logp_seconds += middle - start
            step_seconds += end - middle
            padding = metrics.padding_fraction

    dp = parallel_state.get_data_parallel_world_size()
    global_tokens = tokens * dp * args.steps
    line = (f"{recipe.name}: world {world} (TP {recipe.parallel.tensor_model_parallel_size}, PP "
            f"{recipe.parallel.pipeline_model_parallel_size}, DP {dp}), {args.sequences} sequences x "
            f"{tokens / args.sequences:.0f} tokens per rank; update {global_tokens / step_seconds:,.0f} tokens/s, "
            f"logp pass {global_tokens / logp_seconds:,.0f} tokens/s, padding {padding:.3f}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        mfu = flops * args.steps / step_seconds / peak if peak else float("nan")
        line += (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, MFU {mfu:.1%} of {name} "
                 f"(update only, model FLOPs)")
    else:
        line += f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    if dist.get_rank() == 0:
        print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
