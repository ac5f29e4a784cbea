"""Training/inference mismatch: how far the rollout engine's log-probs are from the trainer's.

FP8 rollouts, fused kernels or RoPE differences make vLLM and Megatron disagree on the same
tokens; the metric shows it every step, and truncated importance sampling (TIS) corrects the
policy gradient for it: each token's loss is weighted by min(pi_train_old / pi_rollout, cap).
"""

from __future__ import annotations

import torch


def logprob_mismatch(rollout_logp: torch.Tensor, train_logp: torch.Tensor, *, threshold: float = 0.1) -> dict:
    """Mean and max |rollout - train| log-prob over the given response tokens, and the fraction above
    `threshold`. Both tensors: the same tokens, any shape (flattened)."""
    diff = (rollout_logp.double() - train_logp.double()).abs().flatten()
    if diff.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "frac_above": 0.0, "tokens": 0}
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
            "frac_above": float((diff > threshold).double().mean()), "tokens": diff.numel()}


def truncated_importance_weights(train_old_logp: torch.Tensor, rollout_logp: torch.Tensor, *, cap: float) -> torch.Tensor:
    """min(exp(logp_train_old - logp_rollout), cap): the TIS weight of each sampled token (no grad)."""
    if cap <= 0:
        raise ValueError(f"the TIS cap must be positive, got {cap}")
    return torch.exp(train_old_logp.detach() - rollout_logp.detach()).clamp(max=cap)
