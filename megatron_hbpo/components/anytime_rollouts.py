"""AnytimeReasoner's two-phase rollouts (docs/anytime.md, "Rollout procedure" and "Integration").

Phase 1 samples G thinking processes per prompt, stopping at `</think>` (kept) or EOS, at most b_m
tokens. Phase 2 asks, per thinking sample, one request per distinct cut c_j = min(b_j, L) whose prompt
is x + z[:c] + the inserted tokens (built from ids), n = (slots sharing the cut) * A, at most
summary_max_tokens; the engine's prefix cache serves the shared x + z prefixes, so only the inserts
and the summaries are new work. The replica's first rank scores every summary (the "**Final Answer**"
piece's last box, verified) and each thinking sample becomes one `AnytimeRecord`: one packed training
row with its m * A summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_hbpo.algo import anytime
from megatron_hbpo.algo.methods import Anytime, AnytimeScores
from megatron_hbpo.components.rollouts import RolloutRecord, RolloutWorker
from megatron_hbpo.components.timer import Timer
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.rollout.engine import Sample, SamplingSettings


@dataclass
class Summary:
    """One forced summary: its slot, inserted ids (context), generated ids (EOS included when emitted),
    the engine's log-probs of those, and its score."""

    slot: int
    inserted_ids: list[int]
    ids: list[int]
    logprobs: torch.Tensor
    reward: float
    format_ok: bool
    text: str = ""


@dataclass
class AnytimeRecord(RolloutRecord):
    """One thinking sample with its m * A summaries (slot-major), as one training row.

    response_ids / logprobs / length are the thinking's (z, L = len(z), `</think>` or EOS included).
    `correct` / `format_ok`: of the first summary at the last slot (acc(b_m) as the step's accuracy).
    """

    ending: str = "ended"
    cuts: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)

    @property
    def sampled_logprobs(self) -> torch.Tensor:
        """The engine's log-probs of every token it sampled in this row: thinking, then each summary."""
        return torch.cat([self.logprobs.float(), *(s.logprobs.float() for s in self.summaries)])

    def sampled(self, logp_response: torch.Tensor) -> torch.Tensor:
        """The trainer's log-probs of the same tokens, out of its per-response-token log-probs of the row."""
        keep = [torch.ones(len(self.response_ids), dtype=torch.bool)]
        for s in self.summaries:
            keep += [torch.zeros(len(s.inserted_ids), dtype=torch.bool), torch.ones(len(s.ids), dtype=torch.bool)]
        return logp_response[torch.cat(keep)]

    def policy_sequence(self, advantage: torch.Tensor) -> PolicySequence:
        """The packed row: prompt + thinking, then each summary's inserted + generated tokens as a branch
        that sees the prompt and the thinking up to its cut (docs/anytime.md, "Integration").
        advantage: [m + m * A], the thinking advantage per slot then the summaries' (Anytime.rewards_and_advantages)."""
        m = len(self.budgets)
        branches, token_adv, trainable = anytime.packed_row(
            len(self.response_ids), self.budgets, advantage[:m], advantage[m:], self.cuts,
            [len(s.inserted_ids) for s in self.summaries], [len(s.ids) for s in self.summaries])
        prompt = len(self.prompt_ids)
        tokens = self.prompt_ids + self.response_ids
        rollout_logp = [self.logprobs.float()]
        for s in self.summaries:
            tokens += s.inserted_ids + s.ids
            rollout_logp += [torch.zeros(len(s.inserted_ids)), s.logprobs.float()]
        return PolicySequence(tokens=tokens, prompt_length=prompt, advantage=0.0,
                              logp_rollout=torch.cat(rollout_logp),
                              branches=[(prompt + cut, span) for cut, span in branches],
                              token_advantages=token_adv, trainable=trainable)

    def metric_row(self, reward: float, advantage: torch.Tensor) -> dict:
        """reward: the prior-weighted return; advantage: the mean of the thinking slots' advantages."""
        return super().metric_row(reward, advantage[: len(self.budgets)].mean())


def anytime_scores(records: Sequence[RolloutRecord]) -> AnytimeScores | None:
    """The summaries' rewards, formats and cuts as tensors ([N, m, A], [N, m]); None for other records."""
    if not records or not isinstance(records[0], AnytimeRecord):
        return None
    rows = [x for x in records if isinstance(x, AnytimeRecord)]
    m = len(rows[0].budgets)
    a = len(rows[0].summaries) // m
    return AnytimeScores(
        rewards=torch.tensor([[s.reward for s in x.summaries] for x in rows], dtype=torch.float64).reshape(-1, m, a),
        format_ok=torch.tensor([[s.format_ok for s in x.summaries] for x in rows]).reshape(-1, m, a),
        cuts=torch.tensor([x.cuts for x in rows], dtype=torch.long),
        thinking_lengths=torch.tensor([len(x.response_ids) for x in rows], dtype=torch.long))


def score_summaries(tokenizer, verifier, *, inserted: Sequence[Sequence[int]], summaries: Sequence[Sequence[int]],
                    prefix_ends_with_eos: Sequence[bool], golds: Sequence[str], think_end_id: int | None,
                    eos_id: int) -> tuple[list[float], list[bool], list[str]]:
    """(reward, format_ok, text) of each summary (docs/anytime.md, "Rewards"): the first "**Final Answer**"
    piece's last box, one batched verifier call, zero after an EOS-ended prefix or a second `</think>`."""
    texts = [anytime.summary_text(tokenizer, ins, ids, eos_id=eos_id) for ins, ids in zip(inserted, summaries)]
    answers = [anytime.extract_summary_answer(t) for t in texts]
    found = [i for i, a in enumerate(answers) if a is not None]
    checked = verifier.check([golds[i] for i in found], [str(answers[i]) for i in found]) if found else []
    correct = [False] * len(texts)
    for i, (ok, _) in zip(found, checked):
        correct[i] = bool(ok)
    has_think_end = [think_end_id is not None and think_end_id in ids for ids in summaries]
    rewards = anytime.summary_rewards(correct, prefix_ends_with_eos=list(prefix_ends_with_eos),
                                      summary_has_think_end=has_think_end)
    return rewards.tolist(), [not x for x in has_think_end], texts


@dataclass
class AnytimeRolloutWorker(RolloutWorker):
    """RolloutWorker with AnytimeReasoner's two phases; the layout, seeding and gathering are the base's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.method, Anytime):
            raise TypeError(f"AnytimeRolloutWorker runs the anytime method, not {self.method.name}")
        tok = self.prompts.tokenizer
        think_end = anytime.think_end_token_id(tok)
        if think_end is None:
            raise ValueError("algo.name=anytime: the tokenizer has no single `</think>` token to stop the thinking at")
        self.think_end_id: int = think_end
        self.eos_id: int = int(tok.eos_token_id)
        self.truncation_ids, self.final_answer_ids = anytime.summary_insert_ids(tok)

    def _generate_and_verify(self, problems: Sequence[PromptRow], mine: range, timer: Timer) -> list[RolloutRecord]:
        method = self.method
        assert isinstance(method, Anytime)
        r = self.rollout
        base = SamplingSettings(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_length)
        sampling = method.thinking_sampling(base, self.think_end_id)
        requests = method.requests(self.prompts, [problems[i] for i in mine], r.n_rollouts, sampling=sampling,
                                   first_group_id=mine.start)
        for request in requests:
            if len(request.prompt_ids) > r.max_prompt_length:
                raise ValueError(f"a prompt has {len(request.prompt_ids)} tokens, more than rollout.max_prompt_length="
                                 f"{r.max_prompt_length}: {problems[request.group_id].problem[:80]!r}")
        self.engine.wake()
        with timer("rollout"):
            thinking: list[Sample] = self.engine.generate(requests)
        plans = [method.summary_plan(s.prompt_ids, s.response_ids, group_id=s.group_id,
                                     sampling=method.summary_sampling(base), think_end_id=self.think_end_id,
                                     eos_id=self.eos_id, truncation_ids=self.truncation_ids,
                                     final_answer_ids=self.final_answer_ids) for s in thinking]
        # Measured apart from the thinking: the summaries' overhead over a plain rollout of the same thinking.
        with timer("rollout_summary"):
            summaries = self.engine.generate([q for plan in plans for q in plan.requests])
        self.engine.sleep()
        if not self.is_leader:
            return []
        assert self.verifier is not None
        with timer("reward"):
            return self._records(problems, thinking, plans, summaries)

    def _records(self, problems: Sequence[PromptRow], thinking: Sequence[Sample], plans: Sequence,
                 summaries: Sequence[Sample]) -> list[RolloutRecord]:
        a = self.method.algo.anytime.n_summaries  # type: ignore[attr-defined]
        drawn = iter(summaries)
        per_sample: list[list[tuple[int, list[int], Sample, bool]]] = []
        for sample, plan in zip(thinking, plans):
            slots: list[tuple[int, list[int], Sample, bool]] = []
            for request, shared, n_inserted in zip(plan.requests, plan.slots, plan.inserted):
                inserted = request.prompt_ids[len(request.prompt_ids) - n_inserted:]
                cut = plan.cuts[shared[0]]
                eos_prefix = sample.response_ids[cut - 1] == self.eos_id
                for slot in shared:  # blocks of A, in slot order
                    slots += [(slot, inserted, next(drawn), eos_prefix) for _ in range(a)]
            slots.sort(key=lambda item: item[0])  # stable: slot-major, draws in order
            per_sample.append(slots)
        flat = [item for slots in per_sample for item in slots]
        golds = [problems[s.group_id].answer for s, slots in zip(thinking, per_sample) for _ in slots]
        rewards, formats, texts = score_summaries(
            self.prompts.tokenizer, self.verifier, inserted=[x[1] for x in flat],
            summaries=[x[2].response_ids for x in flat], prefix_ends_with_eos=[x[3] for x in flat], golds=golds,
            think_end_id=self.think_end_id, eos_id=self.eos_id)
        scores = iter(zip(rewards, formats, texts))
        records: list[RolloutRecord] = []
        budgets = self.method.budgets  # type: ignore[attr-defined]
        for sample, plan, slots in zip(thinking, plans, per_sample):
            summaries_of = []
            for slot, inserted, drawn_sample, _ in slots:
                reward, format_ok, text = next(scores)
                summaries_of.append(Summary(slot=slot, inserted_ids=list(inserted), ids=list(drawn_sample.response_ids),
                                            logprobs=drawn_sample.logprobs, reward=reward, format_ok=format_ok,
                                            text=text))
            final = summaries_of[(len(budgets) - 1) * a]
            problem = problems[sample.group_id]
            records.append(AnytimeRecord(
                prompt_ids=sample.prompt_ids, response_ids=sample.response_ids, logprobs=sample.logprobs,
                length=len(sample.response_ids), budget=None, group_id=sample.group_id, level=problem.level,
                correct=final.reward > 0, format_ok=final.format_ok, truncated=plan.ending == "cut_off",
                text=final.text, problem=problem.problem, ending=plan.ending, cuts=list(plan.cuts),
                budgets=list(budgets), summaries=summaries_of))
        return records
