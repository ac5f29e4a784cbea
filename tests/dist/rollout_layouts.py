"""Rollouts in a rollout layout of their own, next to a Megatron layout, on CPU (gloo).

    python   rollout_layouts.py --model HF_DIR --work DIR                        (world 1: the reference)
    torchrun --nproc-per-node N rollout_layouts.py --model HF_DIR --work DIR --tp T --pp P --rollout-tp R

Every rank builds a vLLM engine (rollout.tensor_parallel_size R: R consecutive ranks per replica) and
the trainer's rollout worker runs one step's prompts. Each rank reports (tests/dist/common.write_report):

- greedy: the response ids of every prompt group, as every rank holds them after the gather (they
  must equal the world-of-one reference);
- allreduce: a Megatron tensor-parallel all-reduce after the engines exist (Megatron's groups keep
  working when vLLM has joined);
- sampled: this rank's own samples at temperature 1 for the same prompts, seeded per replica (ranks
  of one replica must agree, replicas must differ);
- mismatch: after one training step and a refit through the export stream, the rollout vs trainer
  log-prob mismatch of fresh samples (fp32: below 1e-5), and before the refit (it must be larger).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from common import write_report

from megatron_hbpo import runtime
from megatron_hbpo.algo.methods import method_for
from megatron_hbpo.algo.verify import AnswerVerifier
from megatron_hbpo.components.refit import Refitter, mismatch_stats
from megatron_hbpo.components.rollouts import RolloutWorker, policy_sequences, scored_rollouts
from megatron_hbpo.components.timer import Timer
from megatron_hbpo.config import ClusterConfig, ParallelConfig, Recipe, TrainConfig, validate
from megatron_hbpo.convert.hf_io import HFCheckpoint
from megatron_hbpo.convert.mapping import hf_to_megatron
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.model import model_config_from_hf, padded_vocab_size
from megatron_hbpo.megatron.train_step import MegatronPolicy
from megatron_hbpo.rollout.engine import Request, SamplingSettings

PROMPTS = 8  # per step: divisible by any number of replicas used here (1, 2, 4)
PROBLEMS = [PromptRow(f"What is {i} + {2 * i + 1}? Let us think step by step.", str(3 * i + 1)) for i in range(PROMPTS)]


def recipe_for(hf_config, model_dir: str, args, world: int) -> Recipe:
    recipe = Recipe(name="layouts", model=model_config_from_hf(hf_config, params_dtype="fp32", transformer_impl="local",
                                                                hf_path=model_dir),
                    parallel=ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp),
                    cluster=ClusterConfig(gpus_per_node=world, gpu="cpu"),
                    train=TrainConfig(prompts_per_step=PROMPTS, mini_batch_prompts=PROMPTS, micro_batch_tokens=4096,
                                      total_steps=1))
    recipe.rollout.n_rollouts, recipe.rollout.max_prompt_length, recipe.rollout.max_response_length = 2, 64, 24
    recipe.rollout.tensor_parallel_size = args.rollout_tp
    recipe.algo.name, recipe.algo.budgets = "grpo", []
    recipe.data.source, recipe.data.prompt_template = "files", "{problem}"
    recipe.optimizer.lr = 3e-3
    return validate(recipe, world)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rollout-tp", type=int, default=1)
    args = parser.parse_args()
    runtime.configure()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    source = HFCheckpoint(args.model)
    hf_config = source.config
    recipe = recipe_for(hf_config, args.model, args, world)
    parallel.initialize(recipe.parallel, seed=0)
    rank = dist.get_rank()
    from megatron.core import parallel_state

    t = recipe.train
    policy = MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer,
                            micro_batch_tokens=t.micro_batch_tokens, optimizer_steps=1)
    state = hf_to_megatron({n: source.get(n) for n in source.weight_map}, hf_config,
                           padded_vocab_size(hf_config.vocab_size, 1, recipe.model.make_vocab_size_divisible_by))
    policy.load_full_state(state.__getitem__)

    from megatron_hbpo.rollout.vllm_engine import VLLMEngine

    layout = recipe.rollout_layout
    replica = layout.replica_of(rank)
    engine = VLLMEngine(args.model, seed=replica, dtype="float32", max_model_len=128,
                        tensor_parallel_size=args.rollout_tp, cpu_kv_cache_bytes=64 << 20)
    report: dict = {"rank": rank, "replica": replica, "replicas": layout.replicas}
    probe = torch.full((2,), float(rank + 1))
    dist.all_reduce(probe, group=parallel_state.get_tensor_model_parallel_group())
    report["allreduce"] = probe.tolist()
    method = method_for(recipe.algo, l_max=recipe.rollout.max_response_length, temperature=1.0)
    prompts = PromptBuilder(_tokenizer(args.model), PromptFormat.of(recipe.data, recipe.algo))
    with AnswerVerifier(num_workers=1) if layout.is_leader(rank) else _Nothing() as verifier:
        greedy = dict(recipe.rollout.__dict__, temperature=0.0, n_rollouts=1)  # vLLM: greedy means n = 1
        worker = RolloutWorker(type(recipe.rollout)(**greedy), method, prompts, think_close="</think>", layout=layout,
                               engine=engine, verifier=verifier, seed=0)
        timer = Timer()
        records = worker.run(1, PROBLEMS, timer)
        report["greedy"] = {str(x.group_id): [] for x in records}
        for x in records:
            report["greedy"][str(x.group_id)].append(x.response_ids)

        # Temperature 1, this rank's own samples (before any gather), seeded per replica.
        sampling = SamplingSettings(temperature=1.0, max_tokens=16)
        from megatron_hbpo.seeding import seed_everything

        seed_everything(0, "sampled", replica)
        engine.wake()
        samples = engine.generate([Request(prompts.ids(p.problem), n=2, budget=None, sampling=sampling, group_id=i)
                                   for i, p in enumerate(PROBLEMS[:4])])
        report["sampled"] = [s.response_ids for s in samples]

        # One training step on this DP rank's groups, then the refit; the mismatch before and after it.
        worker.rollout = recipe.rollout
        records = worker.run(2, PROBLEMS, timer)
        _, advantages = method.rewards_and_advantages(scored_rollouts(records))
        per_rank = PROMPTS // parallel_state.get_data_parallel_world_size()
        first = parallel_state.get_data_parallel_rank() * per_rank
        chosen = [i for i, x in enumerate(records) if first <= x.group_id < first + per_rank]
        sequences = policy_sequences([records[i] for i in chosen], advantages[chosen])
        for seq, logp in zip(sequences, policy.logprobs(sequences, temperature=1.0)):
            seq.logp_old = logp
        report["mismatch_same_weights"] = mismatch_stats([records[i].logprobs for i in chosen],
                                                         [s.logp_old for s in sequences], threshold=0.1,
                                                         dp_group=parallel_state.get_data_parallel_group())
        for seq in sequences:  # advantages of one sign at least, so that the weights move
            seq.advantage = seq.advantage or 1.0
        policy.train_step(sequences, method.loss())

        def mismatch_now(step: int) -> dict:
            fresh = worker.run(step, PROBLEMS, timer)
            mine = [x for x in fresh if first <= x.group_id < first + per_rank]
            seqs = policy_sequences(mine, torch.zeros(len(mine)))
            return mismatch_stats([x.logprobs for x in mine], policy.logprobs(seqs, temperature=1.0), threshold=0.1,
                                  dp_group=parallel_state.get_data_parallel_group())

        report["mismatch_before_refit"] = mismatch_now(3)
        Refitter(policy.model[0], hf_config, engine, bucket_bytes=16 << 10).refit()
        report["mismatch_after_refit"] = mismatch_now(4)
    write_report(report)
    dist.barrier()
    engine.close()
    return 0


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


if __name__ == "__main__":
    sys.exit(main())
