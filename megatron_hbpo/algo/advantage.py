"""Hierarchical advantage (docs/method.md) and the GRPO baseline.

For the samples of one prompt (rewards R_ij, subgroup i = budget b_i):

    A_inter_ij = (R_ij - mean(R)) / (std(R) + eps)     over all samples of the prompt, std unbiased
    A_intra_i  = mean_j(R_ij) - f2(b_i)                 one value per budget subgroup, not normalised
    A_ij       = A_inter_ij + w_intra * A_intra_i

`center_intra` (our option, default off = paper) subtracts the mean of A_intra over the prompt's
subgroups. The advantage is one scalar per sample; the loss broadcasts it over the response tokens.
"""

from __future__ import annotations

import torch

from megatron_hbpo.algo.constants import ADV_EPS, BETA, L_MAX
from megatron_hbpo.algo.reward import budget_baseline


def segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[num_segments] sums of `values` [N] within each segment id [N] in [0, num_segments)."""
    return torch.zeros(num_segments, dtype=values.dtype).index_add_(0, segment, values)


def segment_mean(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[num_segments] means of `values` [N] within each segment id [N]; NaN for an empty segment."""
    return segment_sum(values, segment, num_segments) / segment_sum(torch.ones_like(values), segment, num_segments)


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense ids [N] in [0, G) and G, for prompt ids [N] of any values and order."""
    unique_groups, group = torch.unique(torch.as_tensor(group_ids), return_inverse=True)
    return group, len(unique_groups)


def group_normalized_advantage(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = ADV_EPS) -> torch.Tensor:
    """(R - mean_group(R)) / (std_group(R) + eps), std with Bessel's correction; 0 for a group of one.

    rewards: [N] floating; group_ids: [N] integer, samples sharing a prompt share an id (any order).
    This is GRPO's advantage and HBPO's inter-budget term.
    """
    rewards, group_ids = check_per_sample(rewards, group_ids)
    group, num_groups = group_index(group_ids)
    mean = segment_mean(rewards, group, num_groups)
    centered = rewards - mean[group]
    sizes = segment_sum(torch.ones_like(rewards), group, num_groups)
    sq = segment_sum(centered * centered, group, num_groups)
    # A group of one has no spread to normalise by: its advantage is 0 (centered is already 0).
    std = torch.sqrt(sq / (sizes - 1).clamp(min=1))
    return centered / (std[group] + eps)


def hierarchical_advantage(
    rewards: torch.Tensor,
    budgets: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    l_max: int = L_MAX,
    beta: float = BETA,
    w_intra: float = 1.0,
    eps: float = ADV_EPS,
    center_intra: bool = False,
) -> torch.Tensor:
    """HBPO advantage, one per sample.

    Args (1-D, one entry per sample): rewards (floating), budgets (the budget each sample was
    generated under), group_ids (integer id of the sample's prompt; any order, groups of any size).
    Returns A_inter + w_intra * A_intra in the dtype of `rewards`.
    """
    rewards, budgets = check_per_sample(rewards, budgets)
    _, group_ids = check_per_sample(rewards, group_ids)
    inter = group_normalized_advantage(rewards, group_ids, eps=eps)
    if w_intra == 0 or rewards.numel() == 0:
        return inter

    # Subgroup = (prompt, budget) pair.
    pairs = torch.stack([group_ids.to(torch.int64), budgets.to(torch.int64)], dim=1)
    unique_pairs, subgroup = torch.unique(pairs, dim=0, return_inverse=True)
    intra = segment_mean(rewards, subgroup, len(unique_pairs)) - budget_baseline(
        unique_pairs[:, 1].to(rewards.dtype), l_max=l_max, beta=beta
    )
    if center_intra:
        _, pair_group = torch.unique(unique_pairs[:, 0], return_inverse=True)
        intra = intra - segment_mean(intra, pair_group, int(pair_group.max()) + 1)[pair_group]
    return inter + w_intra * intra[subgroup]


def check_per_sample(values: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` (floating) and `other` as tensors of one 1-D shape, one entry per sample; else ValueError."""
    values, other = torch.as_tensor(values), torch.as_tensor(other)
    if values.dim() != 1 or values.shape != other.shape:
        raise ValueError(
            f"advantage inputs must be 1-D with one entry per sample, got shapes {tuple(values.shape)} "
            f"and {tuple(other.shape)}"
        )
    if not values.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got {values.dtype}")
    return values, other
