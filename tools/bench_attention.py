"""Time the HBPO step (logp pass + forward/backward + optimizer) with each core attention, in one run.

    python tools/bench_attention.py --config recipes/tiny_cpu.yaml [--backends sdpa unfused] [--steps 10] [overrides]

One policy per backend, the same weights and sequences (tools/bench_train_step.py's), steps taken
in turn (A, B, A, B, ...) so that a machine's drift hits every backend alike. Prints each
backend's seconds per step, its time relative to the first backend's, and how far its log-probs
of the sequences are from the first backend's before any step (the backends compute the same function).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_train_step import make_sequences
from megatron_hbpo import runtime
from megatron_hbpo.algo.methods import method_for
from megatron_hbpo.config import load_recipe
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.model import hf_config_from_recipe
from megatron_hbpo.megatron.state import iter_full_tensors
from megatron_hbpo.megatron.train_step import MegatronPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "unfused"])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backend (after one warm-up each)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipes = {b: load_recipe(args.config, args.overrides + [f"model.attention_backend={b}"]) for b in args.backends}
    first = recipes[args.backends[0]]
    runtime.configure()
    parallel.initialize(first.parallel, first.train.seed)
    t = first.train
    policies = {b: MegatronPolicy(hf_config_from_recipe(r.model), r.model, r.parallel, r.optimizer,
                                  micro_batch_tokens=t.micro_batch_tokens, optimizer_steps=t.total_steps)
                for b, r in recipes.items()}
    loss = method_for(first.algo, l_max=first.rollout.max_response_length, temperature=1.0).loss()
    weights = dict(iter_full_tensors(policies[args.backends[0]].model[0]))
    for policy in policies.values():
        policy.load_full_state(weights.__getitem__)
    sequences = make_sequences(first, args.sequences, rank_seed=0)
    tokens = sum(len(s.tokens) for s in sequences)

    def step(policy: MegatronPolicy) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for seq, logp in zip(sequences, policy.logprobs(sequences, temperature=1.0)):
            seq.logp_old = logp
        policy.train_step(sequences, loss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    base = args.backends[0]
    logps = {b: torch.cat(p.logprobs(sequences, temperature=1.0)) for b, p in policies.items()}  # same weights: same values
    differences = {b: float((logps[b] - logps[base]).abs().max()) for b in policies}
    seconds = {b: 0.0 for b in policies}
    for policy in policies.values():
        step(policy)  # warm-up
    for _ in range(args.steps):
        for backend, policy in policies.items():
            seconds[backend] += step(policy)
    print(f"{first.name}: {args.sequences} sequences, {tokens} tokens per step, {args.steps} steps each, "
          f"{torch.get_num_threads()} threads", flush=True)
    for backend in policies:
        print(f"  {backend:8s} {seconds[backend] / args.steps:.4f} s/step, "
              f"{tokens * args.steps / seconds[backend]:,.0f} "
              f"tokens/s, {seconds[backend] / seconds[base]:.3f} x the time of {base}; log-probs within "
              f"{differences[backend]:.1e} of {base}'s", flush=True)


if __name__ == "__main__":
    main()
