"""Training/inference mismatch: how far the rollout engine's log-probs are from the trainer's.

FP8 rollouts, fused kernels or RoPE differences make vLLM and Megatron disagree on the same
tokens; the metric shows it every step, and truncated importance sampling (TIS) corrects the
policy gradient for it: each token's loss is weighted by min(pi_train_old / pi_rollout, cap).
"""

from __future__ import annotations

import math

import torch


def logprob_mismatch(rollout_logp: torch.Tensor, train_logp: torch.Tensor, *, threshold: float = 0.1) -> dict:
    """Mean and max |rollout - train| log-prob over the given response tokens, and the fraction above
    `threshold`. Both tensors: the same tokens, any shape (flattened)."""
    diff = (rollout_logp.double() - train_logp.double()).abs().flatten()
    if diff.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "frac_above": 0.0, "tokens": 0}
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
            "frac_above": float((diff > threshold).double().mean()), "tokens": diff.numel()}


def truncated_importance_weights(train_old_logp: torch.Tensor, rollout_logp: torch.Tensor, *,
                                 cap: float) -> torch.Tensor:
    """min(exp(logp_train_old - logp_rollout), cap): the TIS weight of each sampled token (no grad)."""
    if cap <= 0:
        raise ValueError(f"the TIS cap must be positive, got {cap}")
    return torch.exp(train_old_logp.detach() - rollout_logp.detach()).clamp(max=cap)


def refit_mismatch_problem(mean_abs: float, *, step: int, baseline: float | None, ceiling: float,
                           factor: float) -> str | None:
    """Why a step's rollout/trainer mismatch after a refit shows a broken refit, or None if it does not.

    mean_abs: mean |logp_rollout - logp_train| over the step's sampled tokens, after at least one refit.
    baseline: the same statistic at step 1, before any refit (None when unknown: a checkpoint that
    predates it). The limit is max(factor * baseline, ceiling): `ceiling` is the dtype's allowance
    (engines on the same weights agree far below it), `factor * baseline` takes over where the engines
    disagree more than that even on identical weights (FP8 rollouts, say).
    """
    limit = max(factor * baseline, ceiling) if baseline is not None else ceiling
    if math.isfinite(mean_abs) and mean_abs <= limit:
        return None
    before = f"{baseline:.2g} at step 1 before any refit" if baseline is not None else "no step-1 value on record"
    return (f"refit check: mean |logp_rollout - logp_train| = {mean_abs:.3g} at step {step} after a refit "
            f"(limit {limit:.2g}; {before}): the rollout engine is not generating with the trained weights "
            "(a stale tied output layer, a tensor the name mapping misses, or a refit that did not run); "
            "stopped before training on these rollouts (rollout.refit_check.enabled=false turns this off)")
