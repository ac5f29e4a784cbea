"""Rollout requests for a batch of problems: one request per (problem, prompt mode), as the method splits
each prompt's n rollouts over its modes (HBPO: n / k samples under each budget; GRPO: n in natural mode)."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_hbpo.data.chat import PromptBuilder, mode_budget
from megatron_hbpo.rollout.engine import Request, SamplingSettings


def build_requests(prompts: PromptBuilder, problems: Sequence[str], modes: Sequence[tuple[str, int]], *,
                   sampling: SamplingSettings, first_group_id: int = 0) -> list[Request]:
    """`modes`: [(prompt mode, samples)] for every problem (Method.prompt_modes). The stated budget is
    recorded on the request (and so on every sample) as data, never parsed back out of the text."""
    items = [(problem, mode) for problem in problems for mode, _ in modes]
    ids = iter(prompts.many(items))
    return [Request(prompt_ids=next(ids), n=count, budget=mode_budget(mode), sampling=sampling,
                    group_id=first_group_id + offset)
            for offset, _ in enumerate(problems) for mode, count in modes]
