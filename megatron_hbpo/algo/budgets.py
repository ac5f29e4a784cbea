"""Budget subgroups (docs/method.md, "Hierarchical budget exploration").

A prompt's n rollouts are split into k equal subgroups, subgroup i generated under budget b_i.
The budget is told to the model by starting the assistant turn with `<think>` and a sentence
("<think> I will answer the question within 512 tokens"). The prefix is prompt: not generated,
no loss, not counted in the response length. Each sample's budget is kept as data; the prompt
text itself is built by data/chat.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_hbpo.algo.constants import BUDGET_TEMPLATE


def assign_budgets(n_rollouts: int, budgets: Sequence[int]) -> list[int | None]:
    """The budget of each of one prompt's n rollouts: k contiguous subgroups of n / k.

    An empty `budgets` (GRPO) gives n unbudgeted rollouts (None).
    """
    if n_rollouts < 1:
        raise ValueError(f"n_rollouts must be >= 1, got {n_rollouts}")
    if not budgets:
        return [None] * n_rollouts
    k = len(budgets)
    if n_rollouts % k:
        raise ValueError(f"n_rollouts={n_rollouts} is not a multiple of the {k} budgets {list(budgets)}")
    per_budget = n_rollouts // k
    return [b for b in budgets for _ in range(per_budget)]


def budget_sentence(budget: int, template: str = BUDGET_TEMPLATE) -> str:
    return template.format(budget=budget)
