"""Budget-aware piecewise reward (docs/method.md) and the GRPO baseline's 0/1 reward.

    f2(b)    = beta * cos(pi * b / (2 * L_max))                    budget baseline R_b
    f1(L, b) = beta * cos(pi * L / (2 * L_max)) - alpha * |L - b|
    R(L, b)  = min(f1, f2) if correct and L <= L_max; 0 if wrong; format_error_reward on a format error
"""

from __future__ import annotations

import math

import torch

from megatron_hbpo.algo.constants import ALPHA, BETA, L_MAX


def float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest floating dtype among the inputs, else the default dtype."""
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.get_default_dtype()
    dtype = floats[0]
    for other in floats[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def per_sample_tensors(where: str, **values: torch.Tensor) -> list[torch.Tensor]:
    """The named inputs as tensors, each 1-D with one entry per sample (one length); else ValueError."""
    tensors = [torch.as_tensor(v) for v in values.values()]
    if any(t.dim() != 1 for t in tensors) or len({t.shape for t in tensors}) != 1:
        names = ", ".join(values)
        raise ValueError(f"{where}: {names} must be 1-D and of one length, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    return tensors


def budget_baseline(budgets: torch.Tensor, *, l_max: int = L_MAX, beta: float = BETA) -> torch.Tensor:
    """f2(b) = beta * cos(pi * b / (2 L_max)): the most a response under budget b can earn."""
    budgets = torch.as_tensor(budgets)
    dtype = float_dtype(budgets)
    return beta * torch.cos(math.pi * budgets.to(dtype) / (2 * l_max))


def hbpo_reward(
    lengths: torch.Tensor,
    budgets: torch.Tensor,
    correct: torch.Tensor,
    format_ok: torch.Tensor,
    *,
    l_max: int = L_MAX,
    alpha: float = ALPHA,
    beta: float = BETA,
    format_error_reward: float = 0.0,
) -> torch.Tensor:
    """One reward per sample.

    Args (1-D, one entry per sample, same length):
        lengths: generated response tokens L (thinking, `</think>`, answer; eos and the budget prefix
            excluded).
        budgets: the budget b the sample was generated under.
        correct: bool, the final answer matches the ground truth.
        format_ok: bool, the response has `</think>` and an extractable final answer.
    Returns: rewards in the widest floating dtype of lengths/budgets (float64 in -> float64 out),
    else the default dtype. A format error wins over correctness; a correct answer longer than
    l_max earns 0.
    """
    lengths, budgets, correct, format_ok = per_sample_tensors(
        "hbpo_reward", lengths=lengths, budgets=budgets, correct=correct, format_ok=format_ok)
    correct, format_ok = correct.bool(), format_ok.bool()
    dtype = float_dtype(lengths, budgets)
    length_f, budget_f = lengths.to(dtype), budgets.to(dtype)

    f2 = budget_baseline(budget_f, l_max=l_max, beta=beta)
    f1 = beta * torch.cos(math.pi * length_f / (2 * l_max)) - alpha * (length_f - budget_f).abs()
    reward = torch.minimum(f1, f2)

    zero = torch.zeros_like(reward)
    reward = torch.where(correct & (length_f <= l_max), reward, zero)
    return torch.where(format_ok, reward, torch.full_like(reward, format_error_reward))


def binary_reward(
    correct: torch.Tensor, format_ok: torch.Tensor, *, format_error_reward: float = 0.0,
    dtype: torch.dtype | None = None
) -> torch.Tensor:
    """GRPO baseline: 1 for a correct answer, 0 for a wrong one, format_error_reward on a format error."""
    correct, format_ok = (t.bool() for t in per_sample_tensors("binary_reward", correct=correct, format_ok=format_ok))
    dtype = dtype or torch.get_default_dtype()
    reward = correct.to(dtype)
    return torch.where(format_ok, reward, torch.full_like(reward, format_error_reward))
