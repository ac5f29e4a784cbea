"""One DP rank's rollouts: prompts -> requests -> engine -> decode -> verify -> records, on the rank that
holds the engine, then handed to the rest of its model-parallel group (every rank of the group trains
on the same records)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_hbpo.algo.methods import Method, ScoredRollouts
from megatron_hbpo.components.timer import Timer
from megatron_hbpo.config import RolloutConfig
from megatron_hbpo.data.chat import NATURAL, PromptBuilder
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.rollout.engine import RolloutEngine, Sample, SamplingSettings
from megatron_hbpo.rollout.requests import samples_by_request, with_forced_response

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier


@dataclass
class RolloutRecord:
    """One scored rollout, as the whole model-parallel group sees it.

    response_ids / logprobs / length include a forced first token (AdaptThink's mode token), whose
    log-prob is the sampling scheme's; `forced` says how many leading response tokens the engine did
    not sample (0 or 1), which the rollout/trainer mismatch statistics leave out. mode: the request's
    prompt mode (data/chat.py); text: the decoded response the verifier read; forced_text: the forced
    token's text ("" when none); problem: the prompt's problem.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor
    length: int
    budget: int | None
    group_id: int
    level: str | None
    correct: bool
    format_ok: bool
    truncated: bool
    mode: str = NATURAL
    forced: int = 0
    text: str = ""
    forced_text: str = ""
    problem: str = ""

    @property
    def sampled_logprobs(self) -> torch.Tensor:
        """The engine's log-probs of the tokens it sampled (a forced first token left out)."""
        return self.logprobs[self.forced:]


def scored_rollouts(records: Sequence[RolloutRecord], *,
                    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ScoredRollouts:
    """The records as the method's tensors; sum_over_ranks: an all-reduce SUM over the data-parallel
    ranks (batch statistics: TLMRE's whitening)."""
    return ScoredRollouts(
        lengths=torch.tensor([x.length for x in records], dtype=torch.float64),
        correct=torch.tensor([x.correct for x in records]),
        format_ok=torch.tensor([x.format_ok for x in records]),
        group_ids=torch.tensor([x.group_id for x in records]),
        budgets=torch.tensor([x.budget if x.budget is not None else float("nan") for x in records],
                             dtype=torch.float64),
        modes=[x.mode for x in records], texts=[x.text for x in records],
        forced_texts=[x.forced_text for x in records], problems=[x.problem for x in records],
        levels=[x.level for x in records],
        response_tokens=torch.tensor([len(x.response_ids) for x in records], dtype=torch.float64),
        **({"sum_over_ranks": sum_over_ranks} if sum_over_ranks is not None else {}),
    )


def policy_sequences(records: Sequence[RolloutRecord], advantages: torch.Tensor) -> list[PolicySequence]:
    return [PolicySequence(tokens=x.prompt_ids + x.response_ids, prompt_length=len(x.prompt_ids),
                           advantage=float(adv), logp_rollout=x.logprobs)
            for x, adv in zip(records, advantages)]


@dataclass
class RolloutWorker:
    """Generates and verifies (on the group's engine rank) and shares the records over `group`.

    engine / verifier: on the engine rank only (None elsewhere). group: the model-parallel group,
    whose first rank `src` holds the engine.
    """

    rollout: RolloutConfig
    method: Method
    prompts: PromptBuilder
    think_close: str
    engine: RolloutEngine | None
    verifier: AnswerVerifier | None
    group: Any
    src: int

    def __post_init__(self) -> None:
        self.holds_engine = dist.get_rank() == self.src
        if self.holds_engine and (self.engine is None or self.verifier is None):
            raise ValueError("the first rank of each model-parallel group needs a rollout engine and a verifier")

    def run(self, problems: Sequence[PromptRow], first_group_id: int, timer: Timer) -> list[RolloutRecord]:
        """Records of `problems` (group ids first_group_id, ...), identical on every rank of the group."""
        records = None
        if self.holds_engine:
            records = self._generate_and_verify(problems, first_group_id, timer)
        if dist.get_world_size(self.group) > 1:
            box = [records]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            records = box[0]
        assert records is not None
        return records

    def _generate_and_verify(self, problems: Sequence[PromptRow], first: int, timer: Timer) -> list[RolloutRecord]:
        assert self.engine is not None and self.verifier is not None
        r = self.rollout
        sampling = SamplingSettings(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_length)
        requests = self.method.requests(self.prompts, problems, r.n_rollouts, sampling=sampling, first_group_id=first)
        for request in requests:
            prompt_length = len(request.prompt_ids) - (request.forced_logprob is not None)
            if prompt_length > r.max_prompt_length:
                raise ValueError(f"a prompt has {prompt_length} tokens, more than rollout.max_prompt_length="
                                 f"{r.max_prompt_length}: {problems[request.group_id - first].problem[:80]!r}")
        with timer("rollout"):
            self.engine.wake()
            generated: list[Sample] = self.engine.generate(requests)
            self.engine.sleep()
        with timer("reward"):
            pairs = samples_by_request(requests, generated)
            samples = [with_forced_response(request, sample) for request, sample in pairs]
            forced = [int(request.forced_logprob is not None) for request, _ in pairs]
            tokenizer = self.prompts.tokenizer
            texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
            forced_texts = tokenizer.batch_decode([s.response_ids[:k] for s, k in zip(samples, forced)],
                                                  skip_special_tokens=True) if any(forced) else [""] * len(samples)
            golds = [problems[s.group_id - first].answer for s in samples]
            verdicts = self.verifier.score(texts, golds, think_close=self.think_close)
        return [RolloutRecord(prompt_ids=s.prompt_ids, response_ids=s.response_ids, logprobs=s.logprobs,
                              length=s.length, budget=s.budget, group_id=s.group_id,
                              level=problems[s.group_id - first].level, correct=v.correct,
                              # A truncated response is a format error (docs/method.md, the reward).
                              format_ok=v.format_ok and not s.truncated, truncated=s.truncated,
                              mode=request.mode, forced=k, text=text, forced_text=forced_text,
                              problem=problems[s.group_id - first].problem)
                for (request, _), s, v, k, text, forced_text in zip(pairs, samples, verdicts, forced, texts,
                                                                      forced_texts)]
