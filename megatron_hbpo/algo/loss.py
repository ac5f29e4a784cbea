"""Clipped policy loss with dual clip, summed over response tokens (docs/method.md).

    rho_t = exp(logp_new - logp_old)
    l_t   = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A)
    l_t   = min(l_t, -c * A)                      when A < 0 (dual clip)
    loss  = sum_t l_t / (response tokens of the whole mini-batch)      ("token-mean")

The function returns the *sum* and the token count of its shard: the global count is known only
after an all-reduce over micro-batches and data-parallel ranks, which is the caller's business, so
that every split of a mini-batch yields the same gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_hbpo.algo.constants import CLIP_EPS_HIGH, CLIP_EPS_LOW, DUAL_CLIP_C

# exp() of a log-ratio beyond this is clipped anyway (see clipped_policy_loss); the clamp keeps an
# overflow from turning into inf * 0 = NaN in backward.
MAX_LOG_RATIO = 20.0


@dataclass
class PolicyLossOutput:
    """Sums over the response tokens of one shard; divide by the global token count to get the loss."""

    loss_sum: torch.Tensor  # scalar, differentiable
    num_tokens: torch.Tensor  # scalar, response tokens in this shard
    clipped_tokens: torch.Tensor  # tokens where the clipped branch is active (gradient cut)
    dual_clipped_tokens: torch.Tensor  # A < 0 tokens bounded by -c * A
    kl_sum: torch.Tensor  # sum of the per-token KL estimate (0 when no reference is given)


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r with log r = logp - logp_ref
    (k3 is the low-variance, always non-negative estimator).
    """
    log_ratio = (logp - logp_ref).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def clipped_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps_low: float = CLIP_EPS_LOW,
    clip_eps_high: float = CLIP_EPS_HIGH,
    dual_clip_c: float = DUAL_CLIP_C,
    logp_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    importance_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Per-token clipped surrogate, summed over the response tokens.

    Args:
        logp_new: [..., T] log-probs of the taken tokens under the policy being trained.
        logp_old: [..., T] the same under the policy that generated the batch (no grad).
        advantages: [...] one per sequence (broadcast over T) or [..., T] per token.
        response_mask: [..., T] bool/0-1, True on response tokens (not prompt, prefix or padding).
        logp_ref: [..., T] reference-model log-probs; with kl_coef > 0 adds kl_coef * KL per token.
        importance_weights: [..., T] per-token weights of the surrogate (truncated importance
            sampling against the rollout engine, algo.mismatch), treated as constants.
    """
    if logp_new.shape != logp_old.shape or logp_new.shape != response_mask.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have one shape"
        )
    if advantages.shape == logp_new.shape[:-1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logp_new.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be per sequence {tuple(logp_new.shape[:-1])} or per token "
            f"{tuple(logp_new.shape)}"
        )
    mask = response_mask.bool()
    advantages = advantages.to(logp_new.dtype).expand_as(logp_new)
    # Masked positions get ratio 1 before exp, so padding garbage can never make NaN gradients.
    log_ratio = torch.where(mask, logp_new - logp_old.detach(), torch.zeros_like(logp_new))
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_bound = -dual_clip_c * advantages
    dual_active = (advantages < 0) & (per_token > dual_bound)
    per_token = torch.where(dual_active, dual_bound, per_token)
    if importance_weights is not None:
        per_token = per_token * torch.where(mask, importance_weights.detach(), torch.zeros_like(per_token))

    kl_sum = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    if logp_ref is not None:
        # Off the mask both log-probs are replaced by 0: log r = 0, where all three estimators are 0.
        zero = torch.zeros_like(logp_new)
        kl = kl_estimate(torch.where(mask, logp_new, zero), torch.where(mask, logp_ref.detach(), zero), kl_estimator)
        kl_sum = kl.sum()
        if kl_coef:
            per_token = per_token + kl_coef * kl

    zero = torch.zeros_like(per_token)
    return PolicyLossOutput(
        loss_sum=torch.where(mask, per_token, zero).sum(),
        num_tokens=mask.sum(),
        clipped_tokens=(mask & (clipped > unclipped) & ~dual_active).sum(),
        dual_clipped_tokens=(mask & dual_active).sum(),
        kl_sum=kl_sum.detach(),
    )


# --------------------------------------------------------------------------------------------------
# The loss handed to the policy's training step: one small protocol for every objective.
# --------------------------------------------------------------------------------------------------


class LossBatch(Protocol):
    """What a loss reads from a micro-batch (megatron/batching.MicroBatch has these fields).

    Shapes: [b, s] per token (aligned with the labels), advantages [b] per sequence or [b, s].
    """

    response_mask: torch.Tensor
    advantages: torch.Tensor
    logp_old: torch.Tensor | None
    logp_ref: torch.Tensor | None
    logp_rollout: torch.Tensor | None
    rows: torch.Tensor | None  # [b] ones, one per sequence (a packed anytime row counts once)


@dataclass
class LossOutput:
    """One micro-batch's share of a loss.

    The mini-batch's loss is sum(loss_sum) / sum(normalizer) over all micro-batches and data-parallel
    ranks: Megatron all-reduces the normalizer and divides the gradients by it, so any split of the
    mini-batch gives the same gradient. `metrics` are sums of what the normalizer counts, divided by
    its total by the caller (e.g. "clip_fraction": the number of clipped tokens for a token-mean loss,
    of clipped sequences for a sequence-mean one).
    """

    loss_sum: torch.Tensor
    normalizer: torch.Tensor
    metrics: dict[str, torch.Tensor]


class PolicyLoss(Protocol):
    """A training objective: per-token log-probs of the labels (at `temperature`) -> LossOutput."""

    @property
    def temperature(self) -> float:
        """The policy's log-probs are taken at this temperature."""

    @property
    def needs_logp_old(self) -> bool:
        """Whether every sequence must carry logp_old before training."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys of LossOutput.metrics, the same on every call."""

    def __call__(self, logp: torch.Tensor, batch: LossBatch) -> LossOutput: ...


@dataclass(frozen=True)
class ClippedLoss:
    """HBPO's and GRPO's objective: `clipped_policy_loss`, token-mean over the mini-batch, with optional
    KL to a reference and truncated importance weights against the rollout engine (algo/mismatch.py)."""

    temperature: float
    clip_eps_low: float = CLIP_EPS_LOW
    clip_eps_high: float = CLIP_EPS_HIGH
    dual_clip_c: float = DUAL_CLIP_C
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    tis_cap: float | None = None
    needs_logp_old: bool = True
    metric_names: tuple[str, ...] = ("clip_fraction", "dual_clip_fraction", "kl")

    def __call__(self, logp: torch.Tensor, batch: LossBatch) -> LossOutput:
        from megatron_hbpo.algo.mismatch import truncated_importance_weights

        assert batch.logp_old is not None  # MegatronPolicy checks needs_logp_old before the step
        weights = None
        if self.tis_cap is not None and batch.logp_rollout is not None:
            weights = truncated_importance_weights(batch.logp_old, batch.logp_rollout, cap=self.tis_cap)
        out = clipped_policy_loss(
            logp, batch.logp_old, batch.advantages, batch.response_mask, clip_eps_low=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high, dual_clip_c=self.dual_clip_c, logp_ref=batch.logp_ref,
            kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, importance_weights=weights,
        )
        return LossOutput(loss_sum=out.loss_sum, normalizer=out.num_tokens,
                          metrics={"clip_fraction": out.clipped_tokens, "dual_clip_fraction": out.dual_clipped_tokens,
                                   "kl": out.kl_sum})


@dataclass(frozen=True)
class SFTLoss:
    """Negative log-likelihood of the response tokens, token-mean: the supervised warm-up. Its
    log-probs are at temperature 1, since it learns the data's own distribution."""

    temperature: float = 1.0
    needs_logp_old: bool = False
    metric_names: tuple[str, ...] = ()

    def __call__(self, logp: torch.Tensor, batch: LossBatch) -> LossOutput:
        mask = batch.response_mask
        return LossOutput(loss_sum=-(logp * mask).sum(), normalizer=mask.sum(), metrics={})


@dataclass(frozen=True)
class AnytimeLoss:
    """AnytimeReasoner's objective (docs/anytime.md, "Loss"): the clipped surrogate with eps on both sides
    and no dual clip, no KL, summed over the trainable tokens of each packed row (thinking tokens once,
    generated summary tokens; per-token advantages), divided by Dr.GRPO's constant N_rows * C
    (`aggregation="constant"`: each row adds C to the normaliser, which Megatron all-reduces, so every token
    weighs 1 / (N_rows * C) however the mini-batch is split) or by the token count ("token_mean").

    Metric: clipped_tokens, the clipped trainable tokens per normaliser unit; components/metrics.py turns it
    into train/clip_fraction (per trained token)."""

    temperature: float
    clip_eps: float = 0.2
    loss_normalizer: int = 10176
    clip_eps_high: float | None = None  # DAPO's clip-higher (the paper's 7B run); None: clip_eps
    aggregation: str = "constant"
    needs_logp_old: bool = True
    metric_names: tuple[str, ...] = ("clipped_tokens",)

    def __call__(self, logp: torch.Tensor, batch: LossBatch) -> LossOutput:
        assert batch.logp_old is not None  # MegatronPolicy checks needs_logp_old before the step
        out = clipped_policy_loss(logp, batch.logp_old, batch.advantages, batch.response_mask,
                                  clip_eps_low=self.clip_eps, dual_clip_c=math.inf,
                                  clip_eps_high=self.clip_eps if self.clip_eps_high is None else self.clip_eps_high)
        if self.aggregation == "constant":
            rows = batch.rows if batch.rows is not None else torch.ones(logp.shape[0])
            normalizer = (rows.sum() * self.loss_normalizer).to(device=logp.device, dtype=torch.long)
        else:
            normalizer = out.num_tokens
        return LossOutput(loss_sum=out.loss_sum, normalizer=normalizer, metrics={"clipped_tokens": out.clipped_tokens})
