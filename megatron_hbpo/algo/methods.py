"""The training methods, each in one place: how a prompt's rollouts split over prompt modes, how the
scored rollouts become rewards and advantages, and which loss the policy is handed.

`method_for(algo, l_max, temperature)` is the only place that looks at `algo.name`; the trainer,
`explain` and the evaluation ask the method, never the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from megatron_hbpo.algo.advantage import group_normalized_advantage, hierarchical_advantage
from megatron_hbpo.algo.budgets import assign_budgets
from megatron_hbpo.algo.loss import ClippedLoss, PolicyLoss
from megatron_hbpo.algo.reward import binary_reward, hbpo_reward
from megatron_hbpo.data.chat import NATURAL, budget_mode

if TYPE_CHECKING:
    from megatron_hbpo.config import AlgoConfig


@dataclass
class ScoredRollouts:
    """One step's verified rollouts as tensors, one entry per sample.

    lengths: [N] response tokens (eos excluded); correct, format_ok: [N] bool; group_ids: [N] int,
    the prompt of each sample; budgets: [N] float, the stated budget (NaN without one).
    """

    lengths: torch.Tensor
    correct: torch.Tensor
    format_ok: torch.Tensor
    group_ids: torch.Tensor
    budgets: torch.Tensor


class Method(Protocol):
    name: str

    def prompt_modes(self, n_rollouts: int) -> list[tuple[str, int]]:
        """How one prompt's n rollouts are requested: [(prompt mode, samples)], in order."""

    def eval_modes(self) -> list[str]:
        """The prompt modes evaluated before and after training."""

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] rewards, [N] advantages), float64."""

    def loss(self) -> PolicyLoss:
        """The objective the policy's training step minimises."""


def _clipped_loss(algo: AlgoConfig, temperature: float) -> ClippedLoss:
    return ClippedLoss(temperature=temperature, clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high,
                       dual_clip_c=algo.dual_clip_c, kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator,
                       tis_cap=algo.tis_cap)


@dataclass
class HBPO:
    """Budgeted subgroups, the budget-aware piecewise reward and the hierarchical advantage (docs/method.md)."""

    algo: AlgoConfig  # config.AlgoConfig
    l_max: int
    temperature: float
    name: str = "hbpo"

    def prompt_modes(self, n_rollouts: int) -> list[tuple[str, int]]:
        budgets = [int(b) for b in assign_budgets(n_rollouts, self.algo.budgets) if b is not None]
        return [(budget_mode(b), budgets.count(b)) for b in dict.fromkeys(budgets)]

    def eval_modes(self) -> list[str]:
        return [NATURAL, *(budget_mode(b) for b in self.algo.budgets)]

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.algo
        rewards = hbpo_reward(rollouts.lengths, rollouts.budgets, rollouts.correct, rollouts.format_ok,
                              l_max=self.l_max, alpha=a.alpha, beta=a.beta, format_error_reward=a.format_error_reward)
        advantages = hierarchical_advantage(rewards, rollouts.budgets, rollouts.group_ids, l_max=self.l_max,
                                            beta=a.beta, w_intra=a.w_intra, eps=a.adv_eps, center_intra=a.center_intra)
        return rewards, advantages

    def loss(self) -> PolicyLoss:
        return _clipped_loss(self.algo, self.temperature)


@dataclass
class GRPO:
    """The baseline: n unbudgeted rollouts, 0/1 reward, group-normalised advantage."""

    algo: AlgoConfig
    temperature: float
    name: str = "grpo"

    def prompt_modes(self, n_rollouts: int) -> list[tuple[str, int]]:
        return [(NATURAL, n_rollouts)]

    def eval_modes(self) -> list[str]:
        return [NATURAL]

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.algo
        rewards = binary_reward(rollouts.correct, rollouts.format_ok, format_error_reward=a.format_error_reward,
                                dtype=torch.float64)
        return rewards, group_normalized_advantage(rewards, rollouts.group_ids, eps=a.adv_eps)

    def loss(self) -> PolicyLoss:
        return _clipped_loss(self.algo, self.temperature)


def method_for(algo: AlgoConfig, *, l_max: int, temperature: float) -> Method:
    """The method a recipe's `algo` section names; `l_max` is rollout.max_response_length and
    `temperature` the rollout temperature (the loss takes log-probs at it)."""
    if algo.name == "hbpo":
        return HBPO(algo, l_max, temperature)
    if algo.name == "grpo":
        return GRPO(algo, temperature)
    raise ValueError(f"algo.name: unknown method {algo.name!r}")
