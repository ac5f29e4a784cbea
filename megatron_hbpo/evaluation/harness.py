"""Problems x prompt modes -> rollout engine -> verifier -> ScoredResponse records.

The one generation-and-scoring path of every evaluation: the trainer's before/after and periodic
evaluation and tools/evaluate.py call it with the package's rollout engine (rollout/engine.py's
protocol), the prompt builder (data/chat.py) and the verifier, so a problem under a mode is prompted,
sampled and scored the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_hbpo.algo.adaptthink import forced_generation_request
from megatron_hbpo.algo.constants import THINK_CLOSE
from megatron_hbpo.data.chat import PromptBuilder, mode_budget
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.evaluation.records import REFLECTION_KEYWORDS, Generated, ScoredResponse, score_responses
from megatron_hbpo.rollout.engine import Request, RolloutEngine, SamplingSettings
from megatron_hbpo.rollout.requests import samples_by_request, with_forced_response

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier


def generate_and_score(engine: RolloutEngine, prompts: PromptBuilder, verifier: AnswerVerifier | None,
                       problems: Sequence[PromptRow], *,
                       benchmark: str, modes: Sequence[str], n: int, sampling: SamplingSettings,
                       think_close: str = THINK_CLOSE, keywords: Sequence[str] = REFLECTION_KEYWORDS,
                       keep_text: bool = True, forced_first: str | None = None) -> list[ScoredResponse]:
    """`n` samples of every problem under every mode, scored. One engine call per mode, in order: the
    engine's random stream (seeded by the caller) is consumed the same way on every run. Without a
    verifier (the other ranks of a tensor-parallel rollout replica, which must generate alongside its
    first rank) the samples are generated and dropped: returns [].

    forced_first: a token every response starts with, forced rather than sampled (AdaptThink's
    Thinking mode, for its R_ref): part of the response, its text and its length; `sampling.max_tokens`
    caps the response with it.
    """
    tokenizer = prompts.tokenizer
    close_ids = tokenizer.encode(think_close, add_special_tokens=False)
    forced_id = None
    if forced_first is not None:
        encoded = tokenizer.encode(forced_first, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"forced first token {forced_first!r} is {len(encoded)} tokens of this tokenizer, not one")
        forced_id = encoded[0]
    records: list[ScoredResponse] = []
    for mode in modes:
        ids = prompts.many([(p.problem, mode) for p in problems])
        budget = mode_budget(mode)
        requests = [Request(prompt_ids=prompt_ids, n=n, budget=budget, sampling=sampling, group_id=i, mode=mode)
                    for i, prompt_ids in enumerate(ids)]
        if forced_id is not None:
            requests = [_forced(request, forced_id) for request in requests]
        generated_samples = engine.generate(requests)
        if verifier is None:
            continue
        samples = [with_forced_response(request, sample)
                   for request, sample in samples_by_request(requests, generated_samples)]
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        generated = [Generated(benchmark, mode, s.group_id, problems[s.group_id].level, problems[s.group_id].answer,
                               text, s.response_ids, s.finish_reason, budget)
                     for s, text in zip(samples, texts)]
        records += score_responses(generated, verifier, eos_token_id=tokenizer.eos_token_id, close_ids=close_ids,
                                   think_close=think_close,
                                   decode=lambda t: tokenizer.decode(t, skip_special_tokens=False),
                                   keywords=keywords, keep_text=keep_text)
    return records


def _forced(request: Request, token_id: int) -> Request:
    """The request with `token_id` forced as its first response token (always: log-prob 0)."""
    prompt_ids, max_tokens = forced_generation_request(request.prompt_ids, token_id, request.sampling.max_tokens)
    return dataclasses.replace(request, prompt_ids=prompt_ids, forced_logprob=0.0,
                               sampling=dataclasses.replace(request.sampling, max_tokens=max_tokens))
