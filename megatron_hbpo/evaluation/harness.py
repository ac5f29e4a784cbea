"""Problems x prompt modes -> rollout engine -> verifier -> ScoredResponse records.

The one generation-and-scoring path of every evaluation: the trainer's before/after and periodic
evaluation and tools/evaluate.py call it with the package's rollout engine (rollout/engine.py's
protocol), the prompt builder (data/chat.py) and the verifier, so a problem under a mode is prompted,
sampled and scored the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_hbpo.algo.constants import THINK_CLOSE
from megatron_hbpo.data.chat import PromptBuilder, mode_budget
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.evaluation.records import REFLECTION_KEYWORDS, Generated, ScoredResponse, score_responses
from megatron_hbpo.rollout.engine import Request, RolloutEngine, SamplingSettings

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier


def generate_and_score(engine: RolloutEngine, prompts: PromptBuilder, verifier: AnswerVerifier | None,
                       problems: Sequence[PromptRow], *,
                       benchmark: str, modes: Sequence[str], n: int, sampling: SamplingSettings,
                       think_close: str = THINK_CLOSE, keywords: Sequence[str] = REFLECTION_KEYWORDS,
                       keep_text: bool = True) -> list[ScoredResponse]:
    """`n` samples of every problem under every mode, scored. One engine call per mode, in order: the
    engine's random stream (seeded by the caller) is consumed the same way on every run. Without a
    verifier (the other ranks of a tensor-parallel rollout replica, which must generate alongside its
    first rank) the samples are generated and dropped: returns []."""
    tokenizer = prompts.tokenizer
    close_ids = tokenizer.encode(think_close, add_special_tokens=False)
    records: list[ScoredResponse] = []
    for mode in modes:
        ids = prompts.many([(p.problem, mode) for p in problems])
        budget = mode_budget(mode)
        samples = engine.generate([Request(prompt_ids=prompt_ids, n=n, budget=budget, sampling=sampling, group_id=i)
                                   for i, prompt_ids in enumerate(ids)])
        if verifier is None:
            continue
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        generated = [Generated(benchmark, mode, s.group_id, problems[s.group_id].level, problems[s.group_id].answer,
                               text, s.response_ids, s.finish_reason, budget)
                     for s, text in zip(samples, texts)]
        records += score_responses(generated, verifier, eos_token_id=tokenizer.eos_token_id, close_ids=close_ids,
                                   think_close=think_close,
                                   decode=lambda t: tokenizer.decode(t, skip_special_tokens=False),
                                   keywords=keywords, keep_text=keep_text)
    return records
