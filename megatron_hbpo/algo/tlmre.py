"""TLMRE baseline, "Training Language Models to Reason Efficiently" (docs/baselines.md, "TLMRE").

No target length: among the correct responses of one prompt, shorter ones are paid more.

    C       = correct responses of the prompt in this batch
    mu      = mean_{j in C} L_j,   sigma = population std_{j in C} L_j + std_eps
    R_i     = 1[i in C] * (1 - alpha * sigmoid((L_i - mu) / sigma))
    A_i     = R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean_group R)       (RLOO, no std)

The released code also whitens all advantages of the rollout batch (one shift and scale over every
response token of every rank); `whitening_moments` + `whiten_advantages` do that (moments are sums,
so the parts of a split batch add up).
"""

from __future__ import annotations

import torch

from megatron_hbpo.algo.advantage import check_per_sample, group_index, segment_mean, segment_sum
from megatron_hbpo.algo.constants import TLMRE_ALPHA as DEFAULT_ALPHA
from megatron_hbpo.algo.constants import TLMRE_STD_EPS as DEFAULT_STD_EPS
from megatron_hbpo.algo.reward import float_dtype, per_sample_tensors

# The authors' settings (docs/baselines.md, "TLMRE") are defined once, in algo/constants.py; the
# recipe's checks of them are config.TLMREConfig's.
WHITEN_MIN_VARIANCE = 1e-8


def tlmre_reward(
    lengths: torch.Tensor,
    correct: torch.Tensor,
    format_ok: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    std_eps: float = DEFAULT_STD_EPS,
) -> torch.Tensor:
    """One reward per sample; the length statistics come from the sample's own group.

    Args (1-D, one entry per sample, any order):
        lengths: generated response tokens L (eos excluded).
        correct: bool, the final answer matches the ground truth.
        format_ok: bool, `</think>` and an extractable answer, and not truncated; a response that
            fails it is wrong and is left out of mu and sigma.
        group_ids: integer id of the sample's prompt.
    Returns: rewards in the widest floating dtype of lengths, else the default dtype. A group
    without a correct response scores 0 everywhere; one correct response (or equal lengths) gives
    z = 0, so R = 1 - alpha / 2.
    """
    lengths, correct, format_ok, group_ids = per_sample_tensors(
        "tlmre_reward", lengths=lengths, correct=correct, format_ok=format_ok, group_ids=group_ids)
    dtype = float_dtype(lengths)
    length_f = lengths.to(dtype)
    solved = correct.bool() & format_ok.bool()
    group, num_groups = group_index(group_ids)

    # Statistics over the solved samples only; groups with none get NaN here, masked out below.
    mu = segment_mean(length_f[solved], group[solved], num_groups)
    deviation = length_f - mu[group]
    variance = segment_mean((deviation * deviation)[solved], group[solved], num_groups)
    sigma = variance.sqrt() + std_eps
    shaped = 1 - alpha * torch.sigmoid(deviation / sigma[group])
    return torch.where(solved, shaped, torch.zeros_like(shaped))


def rloo_advantage(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantage R_i - mean of the other samples of its prompt, no std division.

    rewards: [N] floating; group_ids: [N] integer prompt ids (any order). Returns [N] in the dtype
    of `rewards`; a group of one has no other sample to compare with and gets 0.
    """
    rewards, group_ids = check_per_sample(rewards, group_ids)
    group, num_groups = group_index(group_ids)
    sizes = segment_sum(torch.ones_like(rewards), group, num_groups)[group]
    centered = rewards - segment_mean(rewards, group, num_groups)[group]
    return torch.where(sizes > 1, centered * sizes / (sizes - 1).clamp(min=1), torch.zeros_like(centered))


def whitening_moments(advantages: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """[3] float64 (tokens, sum, sum of squares) of the per-sequence advantages, each weighted by its
    sequence's response tokens; the moments of a split batch are the sums of its parts'.

    advantages: [B] one per sequence; num_tokens: [B] response tokens of each sequence.
    """
    advantages, num_tokens = check_per_sample(advantages, num_tokens)
    weights, values = num_tokens.to(torch.float64), advantages.to(torch.float64)
    return torch.stack([weights.sum(), (weights * values).sum(), (weights * values * values).sum()])


def whiten_advantages(advantages: torch.Tensor, moments: torch.Tensor, *, min_variance: float = WHITEN_MIN_VARIANCE
                      ) -> torch.Tensor:
    """(A - mean) / sqrt(max(var, min_variance)) with the token-weighted mean and population variance
    of the whole rollout batch; `moments` is the global `whitening_moments`. [B] in, [B] out."""
    tokens, total, total_sq = (float(m) for m in moments)
    if tokens <= 0:
        raise ValueError("whiten_advantages: the rollout batch has no response tokens")
    mean = total / tokens
    variance = max(total_sq / tokens - mean * mean, min_variance)
    return ((advantages.to(torch.float64) - mean) / variance ** 0.5).to(advantages.dtype)
