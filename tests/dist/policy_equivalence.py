"""TP / PP / DP equivalence of the Megatron HBPO step on CPU (gloo).

    python  policy_equivalence.py --mode ref --out REF.pt            (world 1: TP = PP = DP = 1)
    torchrun --nproc-per-node 2 policy_equivalence.py --mode tp|pp|dp|dp_distopt --ref REF.pt
    torchrun --nproc-per-node 1 policy_equivalence.py --mode gpu --ref REF.pt    (CUDA against a CPU REF)

For a tiny Qwen2-shaped model (GQA, q/k/v bias, untied) and a tiny Llama-shaped one (MHA, tied
embeddings, Llama-3 rope scaling), the parallel run loads the reference weights and must reproduce
the reference's response log-probs, token-mean loss, gradients (gathered to full tensors) and the
weights after one optimizer step. In dp mode the ranks hold uneven shares of the sequences, and a
NaN advantage on one rank must stop both ranks before the optimizer step. In gpu mode the same step
runs on CUDA in fp32 (TF32 off) against a reference made on CPU, with tolerances for other kernels;
`--attention` picks the core attention of either run (e.g. an unfused CPU reference for SDPA on
CUDA). Exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from megatron_hbpo.config import ClusterConfig, ModelConfig, ParallelConfig, Recipe, TrainConfig, validate
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.model import hf_config_from_recipe
from megatron_hbpo.megatron.state import iter_full_tensors
from megatron_hbpo.megatron.train_step import MegatronPolicy, NonFiniteError

VOCAB = 100
TOL = 2e-6  # fp32, different reduction orders
TOL_STEP = 1e-6  # weights after one Adam step (see adam_eps below)
# CUDA against CPU: other kernels and summation orders; Adam's first step scales gradient
# differences by up to lr / adam_eps = 10.
GPU_TOL, GPU_TOL_STEP = 2e-5, 2e-4

MODELS = {
    "qwen2": dict(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=1e6,
                  add_qkv_bias=True, tie_word_embeddings=False),
    "llama": dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=4, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=5e5,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32},
                  tie_word_embeddings=True),
}
PARALLEL = {
    "ref": ParallelConfig(),
    "tp": ParallelConfig(tensor_model_parallel_size=2),
    "pp": ParallelConfig(pipeline_model_parallel_size=2),
    "dp": ParallelConfig(),
    "dp_distopt": ParallelConfig(),
    "gpu": ParallelConfig(),
}


def recipe_for(family: str, mode: str, world: int, attention: str = "auto") -> Recipe:
    recipe = Recipe(name=f"equiv-{family}-{mode}",
                    model=ModelConfig(params_dtype="fp32", make_vocab_size_divisible_by=8, transformer_impl="local",
                                      attention_backend=attention, **MODELS[family]),
                    parallel=PARALLEL[mode], cluster=ClusterConfig(gpus_per_node=world),
                    train=TrainConfig(prompts_per_step=2, mini_batch_prompts=2, micro_batch_tokens=80, total_steps=1))
    recipe.rollout.max_prompt_length, recipe.rollout.max_response_length = 16, 64
    recipe.algo.budgets = [16, 32]
    recipe.rollout.n_rollouts = 2
    recipe.optimizer.lr = 1e-3
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 a gradient of ~1e-8 that
    # differs in the last bits between reduction orders moves its weight by a different fraction of
    # lr. A larger eps keeps the comparison about the gradients, not about that amplification.
    recipe.optimizer.adam_eps = 1e-4
    recipe.optimizer.use_distributed_optimizer = mode == "dp_distopt"
    return validate(recipe, world)


def make_sequences() -> list[PolicySequence]:
    g = torch.Generator().manual_seed(7)
    sequences = []
    for length, prompt in [(40, 7), (9, 3), (23, 5), (6, 2), (31, 6), (17, 4), (12, 2)]:
        tokens = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        sequences.append(PolicySequence(tokens, prompt, advantage=float(torch.randn(1, generator=g))))
    return sequences


def reference(out_path: str, attention: str) -> int:
    parallel.initialize(ParallelConfig(), seed=1234)
    result = {}
    for family in MODELS:
        recipe = recipe_for(family, "ref", 1, attention)
        policy = MegatronPolicy(recipe, hf_config_from_recipe(recipe.model))
        weights0 = {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}
        sequences = make_sequences()
        logp = policy.logprobs(sequences)
        g = torch.Generator().manual_seed(11)
        # Rollout log-probs a little off the trainer's, so that some ratios are clipped.
        logp_old = [x + 0.3 * torch.randn(x.shape, generator=g) for x in logp]
        for seq, old in zip(sequences, logp_old):
            seq.logp_old = old
        sums, _, _ = policy.forward_backward(sequences)
        grads = {name: t.clone() for name, t in iter_full_tensors(policy.model[0], grads=True)}
        # The same mini-batch in one micro-batch instead of several: the same token-mean gradient.
        recipe.train.micro_batch_tokens = 1000
        _, _, single = policy.forward_backward(sequences)
        recipe.train.micro_batch_tokens = 80
        split_diff = max(float((t - grads[name]).abs().max()) for name, t in iter_full_tensors(policy.model[0], grads=True))
        print(f"ref {family}: 1 vs several micro-batches ({single}) max |grad diff| {split_diff:.1e}", flush=True)
        if single != 1 or split_diff > TOL:
            print(f"FAIL: gradients depend on the micro-batch split ({split_diff:.2e})", flush=True)
            return 1
        policy.optimizer.step()
        weights1 = dict(iter_full_tensors(policy.model[0]))
        result[family] = dict(weights0=weights0, logp=logp, logp_old=logp_old, loss=sums[0] / sums[1],
                              clipped=sums[2], grads=grads, weights1=weights1)
        print(f"ref {family}: loss {float(sums[0] / sums[1]):.6f} over {int(sums[1])} tokens, "
              f"{int(sums[2])} clipped", flush=True)
    torch.save(result, out_path)
    return 0


def max_diff(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    rows = min(got.shape[0], want.shape[0]) if name.endswith(("word_embeddings.weight", "output_layer.weight")) \
        else got.shape[0]
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        # Rows past the real vocabulary are padding whose size depends on TP; they must stay zero-grad.
        assert rows >= VOCAB
    return float((got[:rows].double().cpu() - want[:rows].double().cpu()).abs().max())


def check(mode: str, ref_path: str, attention: str) -> int:
    ref = torch.load(ref_path)
    parallel.initialize(PARALLEL[mode], seed=1234)
    rank, world = dist.get_rank(), dist.get_world_size()
    tol, tol_step = TOL, TOL_STEP
    if mode == "gpu":
        if not torch.cuda.is_available():
            print("FAIL: gpu mode needs CUDA", flush=True)
            return 1
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        tol, tol_step = GPU_TOL, GPU_TOL_STEP
    failures = []
    for family in MODELS:
        recipe = recipe_for(family, mode, world, attention)
        expected = ref[family]
        policy = MegatronPolicy(recipe, hf_config_from_recipe(recipe.model))
        policy.load_full_state(lambda name: expected["weights0"][name])
        sequences = make_sequences()
        mine = list(range(len(sequences)))
        if mode.startswith("dp"):  # uneven data-parallel shares: 2 long sequences vs 5
            mine = [0, 4] if rank == 0 else [1, 2, 3, 5, 6]
        sequences = [sequences[i] for i in mine]

        logp = policy.logprobs(sequences)
        worst = max(float((a - expected["logp"][i]).abs().max()) for a, i in zip(logp, mine))
        report = [f"logp {worst:.1e}"]
        if worst > tol:
            failures.append(f"{family} logp differs by {worst:.2e}")
        for seq, i in zip(sequences, mine):
            seq.logp_old = expected["logp_old"][i]

        sums, padding, micro_batches = policy.forward_backward(sequences)
        loss_diff = abs(float(sums[0] / sums[1] - expected["loss"]))
        report.append(f"loss {loss_diff:.1e}")
        if loss_diff > tol or int(sums[2]) != int(expected["clipped"]):
            failures.append(f"{family} loss differs by {loss_diff:.2e} (clipped {int(sums[2])} vs "
                            f"{int(expected['clipped'])})")
        if not recipe.optimizer.use_distributed_optimizer:  # its grads are reduce-scattered shards
            grad_diff = max(max_diff(name, grad, expected["grads"][name])
                            for name, grad in iter_full_tensors(policy.model[0], grads=True))
            report.append(f"grads {grad_diff:.1e}")
            if grad_diff > tol:
                failures.append(f"{family} gradients differ by {grad_diff:.2e}")
        policy.optimizer.step()
        step_diff = max(max_diff(name, weight, expected["weights1"][name])
                        for name, weight in iter_full_tensors(policy.model[0]))
        report.append(f"weights after step {step_diff:.1e}")
        if step_diff > tol_step:
            failures.append(f"{family} weights after the optimizer step differ by {step_diff:.2e}")
        print(f"rank {rank} {mode} {family}: max |diff| " + ", ".join(report) +
              f"; {micro_batches} micro-batches, padding {padding:.2f}", flush=True)

        if mode == "dp":
            failures += check_nonfinite_stops_the_step(policy, sequences, rank)
    dist.barrier()
    dist.destroy_process_group()
    for failure in failures:
        print(f"rank {rank} FAIL: {failure}", flush=True)
    return 1 if failures else 0


def check_nonfinite_stops_the_step(policy: MegatronPolicy, sequences: list[PolicySequence], rank: int) -> list[str]:
    before = {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}
    if rank == 1:
        sequences[-1].advantage = float("nan")
    try:
        policy.train_step(sequences)
    except NonFiniteError as error:
        message = str(error)
    else:
        return ["a NaN advantage did not stop the step"]
    finally:
        sequences[-1].advantage = 0.0
    expected = "micro-batch holding sequences" if rank == 1 else "another rank"
    print(f"rank {rank} NaN check: {message}", flush=True)
    after = dict(iter_full_tensors(policy.model[0]))
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    problems = []
    if expected not in message:
        problems.append(f"the NaN error does not say where: {message}")
    if changed:
        problems.append(f"weights changed despite the NaN: {changed[:3]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=sorted(PARALLEL), required=True)
    parser.add_argument("--out")
    parser.add_argument("--ref")
    parser.add_argument("--attention", choices=["auto", "sdpa", "unfused"], default="auto")
    args = parser.parse_args()
    if args.mode == "ref":
        return reference(args.out, args.attention)
    return check(args.mode, args.ref, args.attention)


if __name__ == "__main__":
    sys.exit(main())
