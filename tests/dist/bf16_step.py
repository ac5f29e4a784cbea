"""The bf16 training path without Transformer Engine, against the fp32 step on the same weights.

    python bf16_step.py            (one process: TP = PP = DP = 1, the distributed optimizer)

A tiny Qwen2-shaped policy with SDPA attention. The fp32 reference takes one HBPO step's
forward/backward on a mini-batch; then, for each activation-recompute setting (none, selective,
full), a bf16 policy (bf16 params, fp32 gradient buffers, fp32 main weights in the distributed
optimizer) loads the same weights and takes the same step. Checks: the token-mean loss within 1%
relative of fp32's; every parameter's gradient with cosine similarity >= 0.99 to fp32's; with
recompute on, core attention runs twice per layer (it is recomputed) and loss and gradients equal
those without; after the optimizer step the main weights are fp32 and the bf16 params equal them
rounded. The measurements and failed checks are reported as JSON (tests/dist/common.write_report).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import policy_from_recipe, write_report

from megatron_hbpo import runtime
from megatron_hbpo.algo.loss import ClippedLoss
from megatron_hbpo.config import ClusterConfig, ModelConfig, ParallelConfig, Recipe, TrainConfig, validate
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.model import hf_config_from_recipe
from megatron_hbpo.megatron.state import iter_full_tensors
from megatron_hbpo.megatron.train_step import MegatronPolicy  # noqa: F401 (annotations)

VOCAB = 256
LOSS_RTOL = 0.01
MIN_COSINE = 0.99
LOSS = ClippedLoss(temperature=1.0)
REPORT: dict = {"steps": {}}
RECOMPUTE_TOL = 1e-6  # recomputation repeats the same bf16 arithmetic


def recipe_for(dtype: str, recompute: str | None) -> Recipe:
    model = ModelConfig(family="qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                        num_query_groups=2, kv_channels=32, vocab_size=VOCAB, max_position_embeddings=256,
                        rope_theta=1e6, add_qkv_bias=True, params_dtype=dtype, make_vocab_size_divisible_by=128,
                        attention_backend="sdpa")
    recipe = Recipe(name=f"bf16-{dtype}-{recompute}", model=model,
                    parallel=ParallelConfig(recompute_granularity=recompute), cluster=ClusterConfig(gpus_per_node=1),
                    train=TrainConfig(prompts_per_step=2, mini_batch_prompts=2, micro_batch_tokens=160, total_steps=1))
    recipe.rollout.max_prompt_length, recipe.rollout.max_response_length = 16, 96
    recipe.algo.budgets = [32, 64]
    recipe.rollout.n_rollouts = 2
    recipe.optimizer.lr = 1e-3
    recipe.optimizer.use_distributed_optimizer = True
    return validate(recipe, 1)


def make_sequences() -> list[PolicySequence]:
    g = torch.Generator().manual_seed(3)
    sequences = []
    for length, prompt in [(70, 9), (33, 5), (52, 12), (18, 4), (61, 7), (40, 10)]:
        tokens = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        sequences.append(PolicySequence(tokens, prompt, advantage=float(torch.randn(1, generator=g))))
    return sequences


def step_without_update(policy: MegatronPolicy, sequences: list[PolicySequence]) -> tuple[float, dict, float]:
    """(loss, full gradients, core-attention calls per layer and micro-batch: 2 when recomputed)."""
    calls = []
    hooks = [module.register_forward_hook(lambda *_: calls.append(1))
             for name, module in policy.model[0].named_modules() if name.endswith("core_attention")]
    sums, _, micro_batches = policy.forward_backward(sequences, LOSS)
    for hook in hooks:
        hook.remove()
    grads = {name: t.float().clone() for name, t in iter_full_tensors(policy.model[0], grads=True)}
    return float(sums["loss"] / sums["normalizer"]), grads, len(calls) / (len(hooks) * micro_batches)


def main() -> int:
    runtime.configure()
    parallel.initialize(ParallelConfig(), seed=1234)
    failures: list[str] = []
    reference = policy_from_recipe(recipe_for("fp32", None), hf_config_from_recipe(recipe_for("fp32", None).model))
    weights = {name: t.clone() for name, t in iter_full_tensors(reference.model[0])}
    sequences = make_sequences()
    g = torch.Generator().manual_seed(11)
    for seq, logp in zip(sequences, reference.logprobs(sequences, temperature=1.0)):
        # A little off the policy, so that some tokens are clipped in both runs.
        seq.logp_old = logp + 0.2 * torch.randn(logp.shape, generator=g)
    ref_loss, ref_grads, _ = step_without_update(reference, sequences)
    REPORT["fp32_loss"] = ref_loss
    del reference

    first: tuple[float, dict] | None = None
    for recompute in (None, "selective", "full"):
        recipe = recipe_for("bf16", recompute)
        policy = policy_from_recipe(recipe, hf_config_from_recipe(recipe.model))
        policy.load_full_state(weights.__getitem__)
        dtypes = {p.dtype for p in policy.model[0].parameters()}
        if dtypes != {torch.bfloat16}:
            failures.append(f"bf16 policy has params of {dtypes}")
        logp = policy.logprobs(sequences, temperature=1.0)
        if not all(bool(torch.isfinite(x).all()) for x in logp):
            failures.append(f"recompute={recompute}: non-finite log-probs")
        loss, grads, calls = step_without_update(policy, sequences)
        if calls != (1 if recompute is None else 2):
            failures.append(f"recompute={recompute}: core attention ran {calls} times per layer and micro-batch")
        rel = abs(loss - ref_loss) / abs(ref_loss)
        cosines = {name: float(F.cosine_similarity(grads[name].flatten().double(), ref.flatten().double(), dim=0))
                   for name, ref in ref_grads.items() if ref.abs().max() > 0}
        worst = min(cosines, key=cosines.get)
        REPORT["steps"][str(recompute)] = {"loss": loss, "relative_loss_diff": rel, "lowest_cosine": cosines[worst],
                                           "lowest_cosine_param": worst, "core_attention_runs": calls}
        if rel > LOSS_RTOL:
            failures.append(f"recompute={recompute}: loss {loss} vs fp32 {ref_loss} ({rel:.2%} > 1%)")
        low = [f"{n} {c:.4f}" for n, c in cosines.items() if c < MIN_COSINE]
        if low:
            failures.append(f"recompute={recompute}: gradient cosine below {MIN_COSINE}: {low[:4]}")
        if first is None:
            first = (loss, grads)
        else:
            diff = max(float((grads[n] - first[1][n]).abs().max() / max(1e-12, float(first[1][n].abs().max())))
                       for n in grads)
            REPORT["steps"][str(recompute)].update(loss_diff_vs_none=abs(loss - first[0]), grad_diff_vs_none=diff)
            if abs(loss - first[0]) > RECOMPUTE_TOL or diff > RECOMPUTE_TOL:
                failures.append(f"recompute={recompute} changes the result: loss {abs(loss - first[0]):.2e}, "
                                f"grads {diff:.2e}")
        failures += check_update(policy, recompute)
        del policy

    write_report({**REPORT, "failures": failures})
    return 0


def check_update(policy: MegatronPolicy, recompute: str | None) -> list[str]:
    """One optimizer step: fp32 main weights, bf16 params that are those weights rounded."""
    before = {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}
    updated, grad_norm, _ = policy.optimizer.step()
    problems = []
    pairs = [(param, main) for optimizer in policy.optimizer.chained_optimizers
             for params, mains in zip(optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups)
             for param, main in zip(params, mains)]
    if not pairs or {main.dtype for _, main in pairs} != {torch.float32}:
        problems.append(f"recompute={recompute}: main weights are {({m.dtype for _, m in pairs})}, not fp32")
    after = dict(iter_full_tensors(policy.model[0]))
    if not updated or not all(bool(torch.isfinite(t).all()) for t in after.values()):
        problems.append(f"recompute={recompute}: the step did not update to finite weights")
    if all(torch.equal(before[n], after[n]) for n in after):
        problems.append(f"recompute={recompute}: the step changed no weight")
    # With one data-parallel rank each main weight is a whole parameter.
    mismatched = [tuple(param.shape) for param, main in pairs
                  if main.numel() != param.numel() or not torch.equal(param.detach().view(-1),
                                                                       main.detach().view(-1).to(torch.bfloat16))]
    if mismatched:
        problems.append(f"recompute={recompute}: bf16 params {mismatched[:3]} differ from their rounded main weights")
    REPORT["steps"][str(recompute)].update(grad_norm=float(grad_norm), fp32_main_weights=len(pairs))
    return problems


if __name__ == "__main__":
    sys.exit(main())
