"""A step's rollouts on every rank: prompts -> requests -> engine -> decode -> verify -> records.

Each rollout replica (rollout/layout.py) generates its block of the step's prompts: every rank of
the replica runs the same requests with the same random state (vLLM's tensor parallelism needs
identical scheduling on its ranks), and the replica's first rank decodes and verifies. The records
of all replicas are then gathered on every rank, so each training data-parallel rank finds the prompt
groups it trains on, whatever the two layouts are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_hbpo.algo.methods import Method, ScoredRollouts
from megatron_hbpo.components.timer import Timer
from megatron_hbpo.config import RolloutConfig
from megatron_hbpo.data.chat import NATURAL, PromptBuilder
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.rollout.engine import RolloutEngine, Sample, SamplingSettings
from megatron_hbpo.rollout.layout import RolloutLayout
from megatron_hbpo.rollout.requests import samples_by_request, with_forced_response
from megatron_hbpo.seeding import seed_everything

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier


@dataclass
class RolloutRecord:
    """One scored rollout, every rank holds all of a step's records.

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

    def sampled(self, logp_response: torch.Tensor) -> torch.Tensor:
        """The trainer's log-probs of the tokens the engine sampled, from its log-probs of every response token
        of this record's sequence (aligned with `sampled_logprobs`)."""
        return logp_response[self.forced:]

    def policy_sequence(self, advantage: torch.Tensor) -> PolicySequence:
        """The sequence the policy trains on, with this record's advantage (a scalar here)."""
        return PolicySequence(tokens=self.prompt_ids + self.response_ids, prompt_length=len(self.prompt_ids),
                              advantage=float(advantage), logp_rollout=self.logprobs)

    def metric_row(self, reward: float, advantage: torch.Tensor) -> dict:
        """The record's row of the step's metrics (components/metrics.step_summary)."""
        return {"budget": self.budget, "level": self.level, "length": self.length, "correct": self.correct,
                "format_ok": self.format_ok, "truncated": self.truncated, "reward": float(reward),
                "advantage": float(advantage)}


def scored_rollouts(records: Sequence[RolloutRecord]) -> ScoredRollouts:
    """The records as the method's tensors."""
    from megatron_hbpo.components.anytime_rollouts import anytime_scores

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
        anytime=anytime_scores(records),
    )


def policy_sequences(records: Sequence[RolloutRecord], advantages: torch.Tensor) -> list[PolicySequence]:
    return [x.policy_sequence(adv) for x, adv in zip(records, advantages)]


@dataclass
class RolloutWorker:
    """Runs the step's rollouts in the rollout layout and hands every rank all of the step's records.

    engine: on every rank. verifier: on each replica's first rank (None elsewhere). seed: the run's
    seed; a step's sampling is seeded from (seed, step, replica), the same on a replica's ranks and
    different between replicas.
    """

    rollout: RolloutConfig
    method: Method
    prompts: PromptBuilder
    think_close: str
    layout: RolloutLayout
    engine: RolloutEngine
    verifier: AnswerVerifier | None
    seed: int

    def __post_init__(self) -> None:
        rank = dist.get_rank()
        self.replica = self.layout.replica_of(rank)
        self.is_leader = self.layout.is_leader(rank)
        if self.is_leader and self.verifier is None:
            raise ValueError("the first rank of each rollout replica needs a verifier")

    def run(self, step: int, problems: Sequence[PromptRow], timer: Timer) -> list[RolloutRecord]:
        """The records of all of `problems` (the step's prompts; group id = index), on every rank."""
        mine = self.layout.prompt_range(self.replica)
        # Seeded per replica: vLLM's CPU sampling draws from the global torch generator.
        seed_everything(self.seed, "step", step, self.replica)
        records = self._generate_and_verify(problems, mine, timer)
        if dist.get_world_size() == 1:
            return records
        with timer("gather"):
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)  # replicas in rank order: groups in order
        return [record for part in gathered for record in part]

    def _generate_and_verify(self, problems: Sequence[PromptRow], mine: range, timer: Timer) -> list[RolloutRecord]:
        r = self.rollout
        sampling = SamplingSettings(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_length)
        requests = self.method.requests(self.prompts, [problems[i] for i in mine], r.n_rollouts, sampling=sampling,
                                        first_group_id=mine.start)
        for request in requests:
            prompt_length = len(request.prompt_ids) - (request.forced_logprob is not None)
            if prompt_length > r.max_prompt_length:
                raise ValueError(f"a prompt has {prompt_length} tokens, more than rollout.max_prompt_length="
                                 f"{r.max_prompt_length}: {problems[request.group_id].problem[:80]!r}")
        with timer("rollout"):
            self.engine.wake()
            generated: list[Sample] = self.engine.generate(requests)
            self.engine.sleep()
        if not self.is_leader:
            return []
        assert self.verifier is not None
        with timer("reward"):
            pairs = samples_by_request(requests, generated)
            samples = [with_forced_response(request, sample) for request, sample in pairs]
            forced = [int(request.forced_logprob is not None) for request, _ in pairs]
            tokenizer = self.prompts.tokenizer
            texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
            forced_texts = tokenizer.batch_decode([s.response_ids[:k] for s, k in zip(samples, forced)],
                                                  skip_special_tokens=True) if any(forced) else [""] * len(samples)
            golds = [problems[s.group_id].answer for s in samples]
            verdicts = self.verifier.score(texts, golds, think_close=self.think_close)
        return [RolloutRecord(prompt_ids=s.prompt_ids, response_ids=s.response_ids, logprobs=s.logprobs,
                              length=s.length, budget=s.budget, group_id=s.group_id,
                              level=problems[s.group_id].level, correct=v.correct,
                              # A truncated response is a format error (docs/method.md, the reward).
                              format_ok=v.format_ok and not s.truncated, truncated=s.truncated,
                              mode=request.mode, forced=k, text=text, forced_text=forced_text,
                              problem=problems[s.group_id].problem)
                for (request, _), s, v, k, text, forced_text in zip(pairs, samples, verdicts, forced, texts,
                                                                      forced_texts)]
