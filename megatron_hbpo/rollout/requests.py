"""Budgeted rollout requests for a batch of problems (HBPO_SPEC.md s1)."""

from __future__ import annotations

from typing import Any

from megatron_hbpo.algo.budgets import assign_budgets, build_prompt
from megatron_hbpo.config import AlgoConfig, DataConfig
from megatron_hbpo.rollout.engine import Request, SamplingSettings


def budgeted_requests(tokenizer: Any, problems: list[str], *, n_rollouts: int, algo: AlgoConfig, data: DataConfig,
                      sampling: SamplingSettings, first_group_id: int = 0) -> list[Request]:
    """One request per (problem, budget): n_rollouts / k samples each, the budget prefix in the prompt.

    GRPO (no budgets) gives one unbudgeted request of n_rollouts samples per problem. The budget is
    recorded on the request (and so on every sample) as data, never parsed back out of the text.
    """
    requests = []
    for offset, problem in enumerate(problems):
        user_text = data.prompt_template.format(problem=problem)
        budgets = assign_budgets(n_rollouts, algo.budgets)
        for budget in dict.fromkeys(budgets):  # distinct budgets, in order
            text = build_prompt(tokenizer, user_text, budget, template=algo.budget_template,
                                think_open=algo.think_open, system_prompt=data.system_prompt)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            requests.append(Request(prompt_ids=prompt_ids, n=budgets.count(budget), budget=budget, sampling=sampling,
                                    group_id=first_group_id + offset))
    return requests
