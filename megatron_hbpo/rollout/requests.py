"""Rollout requests for a batch of problems: one request per (problem, prompt mode), as the method splits
each prompt's n rollouts over its modes (HBPO: n / k samples under each budget; GRPO: n in natural mode);
and the engine's samples as the trainer sees them (forced first tokens moved into the response)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_hbpo.algo.adaptthink import forced_rollout
from megatron_hbpo.data.chat import PromptBuilder, mode_budget
from megatron_hbpo.rollout.engine import Request, Sample, SamplingSettings


def build_requests(prompts: PromptBuilder, problems: Sequence[str], modes: Sequence[tuple[str, int]], *,
                   sampling: SamplingSettings, first_group_id: int = 0) -> list[Request]:
    """`modes`: [(prompt mode, samples)] for every problem (e.g. HBPO.prompt_modes). The prompt mode and
    the stated budget are recorded on the request (and so on every sample) as data, never parsed back
    out of the text."""
    items = [(problem, mode) for problem in problems for mode, _ in modes]
    ids = iter(prompts.many(items))
    return [Request(prompt_ids=next(ids), n=count, budget=mode_budget(mode), sampling=sampling,
                    group_id=first_group_id + offset, mode=mode)
            for offset, _ in enumerate(problems) for mode, count in modes]


def samples_by_request(requests: Sequence[Request], samples: Sequence[Sample]) -> list[tuple[Request, Sample]]:
    """Each sample with the request it answers: the engine returns `n` samples per request, in request
    order (RolloutEngine.generate)."""
    owners = [request for request in requests for _ in range(request.n)]
    if len(owners) != len(samples) or any(r.group_id != s.group_id for r, s in zip(owners, samples)):
        raise ValueError(f"the engine returned {len(samples)} samples for {len(owners)} requested, or out of order")
    return list(zip(owners, samples))


def with_forced_response(request: Request, sample: Sample) -> Sample:
    """The sample as the trainer sees it: the request's forced token (its last prompt id) moved to the
    front of the response, its sampling-scheme log-prob in front of the engine's (algo/adaptthink.py,
    `forced_rollout`). The sample itself when nothing was forced.

    Its length (L) then counts the forced token, and its prompt ends before it.
    """
    if request.forced_logprob is None:
        return sample
    prompt, forced = sample.prompt_ids[:-1], sample.prompt_ids[-1]
    tokens, prompt_length, logprobs = forced_rollout(prompt, forced, sample.response_ids, sample.logprobs.tolist(),
                                                     forced_logprob=request.forced_logprob)
    assert logprobs is not None
    return dataclasses.replace(sample, prompt_ids=tokens[:prompt_length], response_ids=tokens[prompt_length:],
                               logprobs=torch.tensor(logprobs, dtype=sample.logprobs.dtype))
