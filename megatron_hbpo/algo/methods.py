"""The training methods, each in one place: how a prompt's rollouts are requested, how the scored
rollouts become rewards and advantages, and which loss the policy is handed.

`method_for(algo, l_max, temperature)` is the only place that looks at `algo.name`; the trainer,
`explain` and the evaluation ask the method, never the name. HBPO and GRPO are docs/method.md's;
L1-Exact / L1-Max, TLMRE and AdaptThink are docs/baselines.md's, built from their pure functions in
algo/l1.py, algo/tlmre.py and algo/adaptthink.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from megatron_hbpo.algo.adaptthink import (
    AdaptThinkLoss,
    adaptthink_reward,
    assign_modes,
    forced_generation_request,
    lookup_reference_accuracy,
    mode_logprob,
    reference_key,
    think_tag_counts,
)
from megatron_hbpo.algo.advantage import group_normalized_advantage, hierarchical_advantage
from megatron_hbpo.algo.budgets import assign_budgets
from megatron_hbpo.algo.l1 import l1_reward, problem_target
from megatron_hbpo.algo.loss import AnytimeLoss, ClippedLoss, PolicyLoss
from megatron_hbpo.algo.reward import binary_reward, hbpo_reward
from megatron_hbpo.algo.tlmre import rloo_advantage, tlmre_reward, whiten_advantages, whitening_moments
from megatron_hbpo.data.chat import NATURAL, budget_mode, length_mode, mode_length_instruction
from megatron_hbpo.rollout.engine import Request, SamplingSettings
from megatron_hbpo.rollout.requests import build_requests

if TYPE_CHECKING:
    from megatron_hbpo.config import AlgoConfig
    from megatron_hbpo.data.chat import PromptBuilder
    from megatron_hbpo.data.prompts import PromptRow


@dataclass
class ScoredRollouts:
    """One step's verified rollouts (all of them: every rank holds the whole step), one entry per sample.

    lengths: [N] response tokens L (eos excluded, a forced first token included); correct, format_ok:
    [N] bool; group_ids: [N] int, the prompt of each sample; budgets: [N] float, the stated budget
    (NaN without one). The rest is what some baselines read: modes (the prompt mode of each request,
    data/chat.py; empty = all natural), texts (the decoded responses, forced token included, as the
    verifier read them), forced_texts (the forced first token's text, "" when none), problems and
    levels (of each sample's prompt) and response_tokens ([N] trained tokens, eos included).
    """

    lengths: torch.Tensor
    correct: torch.Tensor
    format_ok: torch.Tensor
    group_ids: torch.Tensor
    budgets: torch.Tensor
    modes: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    forced_texts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    levels: list[str | None] = field(default_factory=list)
    response_tokens: torch.Tensor | None = None
    anytime: AnytimeScores | None = None


@dataclass
class AnytimeScores:
    """The summaries of two-phase rollouts (docs/anytime.md), one entry per thinking sample: rewards and
    format_ok [N, m, A] (slot j's A draws), cuts [N, m] c_j, thinking_lengths [N] L."""

    rewards: torch.Tensor
    format_ok: torch.Tensor
    cuts: torch.Tensor
    thinking_lengths: torch.Tensor


@dataclass(frozen=True)
class ReferenceSpec:
    """A measurement of the base model a method needs before its first step: AdaptThink's R_ref, the
    accuracy of `samples` Thinking-mode responses (first response token `forced_token`), per problem
    or per level (`keyed_by`, with `problems_per_level` problems of each level). The trainer's
    components/reference.py runs it through the evaluation harness and hands the table back with
    `Method.use_reference`."""

    samples: int
    keyed_by: str
    problems_per_level: int
    forced_token: str


class Method(Protocol):
    name: str

    def requests(self, prompts: PromptBuilder, problems: Sequence[PromptRow], n_rollouts: int, *,
                 sampling: SamplingSettings, first_group_id: int) -> list[Request]:
        """The engine requests of one step's `problems` (group ids first_group_id, ...), n_rollouts samples
        per problem. Each request records its prompt mode, budget and forced token as data."""

    def eval_modes(self) -> list[str]:
        """The prompt modes evaluated before and after training."""

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] rewards, [N] advantages), float64."""

    def loss(self) -> PolicyLoss:
        """The objective the policy's training step minimises."""

    def reference(self) -> ReferenceSpec | None:
        """What the method measures on the base model before its first step (AdaptThink's R_ref), or None."""

    def use_reference(self, table: Mapping[str, float]) -> None:
        """Receive that measurement, on every rank, before the first step."""

    def step_metrics(self, rollouts: ScoredRollouts) -> dict[str, float]:
        """Method-specific metrics of the step's rollouts (AnytimeReasoner's acc(b) and variance diagnostics)."""


def _clipped_loss(algo: AlgoConfig, temperature: float) -> ClippedLoss:
    dual_clip_c = algo.dual_clip_c if algo.dual_clip_c is not None else math.inf
    return ClippedLoss(temperature=temperature, clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high,
                       dual_clip_c=dual_clip_c, kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator,
                       tis_cap=algo.tis_cap)


class _PromptModes:
    """Defaults of the methods whose prompts do not depend on the problem: one request per (problem,
    prompt mode) from `prompt_modes`, the clipped loss, no reference measurement."""

    algo: AlgoConfig
    temperature: float
    name: str

    def prompt_modes(self, n_rollouts: int) -> list[tuple[str, int]]:
        """How one prompt's n rollouts are requested: [(prompt mode, samples)], in order."""
        return [(NATURAL, n_rollouts)]

    def requests(self, prompts: PromptBuilder, problems: Sequence[PromptRow], n_rollouts: int, *,
                 sampling: SamplingSettings, first_group_id: int) -> list[Request]:
        return build_requests(prompts, [p.problem for p in problems], self.prompt_modes(n_rollouts),
                              sampling=sampling, first_group_id=first_group_id)

    def eval_modes(self) -> list[str]:
        return [NATURAL]

    def loss(self) -> PolicyLoss:
        return _clipped_loss(self.algo, self.temperature)

    def reference(self) -> ReferenceSpec | None:
        return None

    def use_reference(self, table: Mapping[str, float]) -> None:
        raise TypeError(f"{self.name} measures nothing on the base model")

    def step_metrics(self, rollouts: ScoredRollouts) -> dict[str, float]:
        return {}


@dataclass
class HBPO(_PromptModes):
    """Budgeted subgroups, the budget-aware piecewise reward and the hierarchical advantage (docs/method.md)."""

    algo: AlgoConfig  # config.AlgoConfig
    l_max: int
    temperature: float
    name: str = "hbpo"

    def prompt_modes(self, n_rollouts: int) -> list[tuple[str, int]]:
        budgets = [int(b) for b in assign_budgets(n_rollouts, self.algo.budgets) if b is not None]
        return [(budget_mode(b), budgets.count(b)) for b in dict.fromkeys(budgets)]

    def eval_modes(self) -> list[str]:
        return [NATURAL, *(budget_mode(b) for b in self.algo.budgets)]

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.algo
        rewards = hbpo_reward(rollouts.lengths, rollouts.budgets, rollouts.correct, rollouts.format_ok,
                              l_max=self.l_max, alpha=a.alpha, beta=a.beta, format_error_reward=a.format_error_reward)
        advantages = hierarchical_advantage(rewards, rollouts.budgets, rollouts.group_ids, l_max=self.l_max,
                                            beta=a.beta, w_intra=a.w_intra, eps=a.adv_eps, center_intra=a.center_intra)
        return rewards, advantages


@dataclass
class GRPO(_PromptModes):
    """The baseline: n unbudgeted rollouts, 0/1 reward, group-normalised advantage."""

    algo: AlgoConfig
    temperature: float
    name: str = "grpo"

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.algo
        rewards = binary_reward(rollouts.correct, rollouts.format_ok, format_error_reward=a.format_error_reward,
                                dtype=torch.float64)
        return rewards, group_normalized_advantage(rewards, rollouts.group_ids, eps=a.adv_eps)


@dataclass
class L1(_PromptModes):
    """L1-Exact / L1-Max (docs/baselines.md, "L1"): each problem's target (N, mode) in its user turn, one
    per problem for all its rollouts and every epoch; the L1 reward; GRPO's advantage; the clipped loss."""

    algo: AlgoConfig
    temperature: float
    name: str = "l1_exact"

    def target_mode(self, problem: str) -> str:
        """The prompt mode of a problem: length:N or max_length:N, a function of (algo.l1.target_seed, text)."""
        c = self.algo.l1
        target, kind = problem_target(c.target_seed, problem, stage=c.stage, n_min=c.n_min, n_max=c.n_max,
                                      max_fraction=c.max_fraction)
        return length_mode(target, kind)

    def requests(self, prompts: PromptBuilder, problems: Sequence[PromptRow], n_rollouts: int, *,
                 sampling: SamplingSettings, first_group_id: int) -> list[Request]:
        modes = [self.target_mode(p.problem) for p in problems]
        ids = prompts.many([(p.problem, mode) for p, mode in zip(problems, modes)])
        return [Request(prompt_ids=prompt_ids, n=n_rollouts, budget=None, sampling=sampling,
                        group_id=first_group_id + offset, mode=mode)
                for offset, (prompt_ids, mode) in enumerate(zip(ids, modes))]

    def eval_modes(self) -> list[str]:
        return [NATURAL, *(length_mode(n, self.algo.l1.stage) for n in self.algo.l1.eval_targets)]

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.algo.l1
        modes = rollouts.modes or [NATURAL] * len(rollouts.lengths)
        targets = [mode_length_instruction(m) or (0, "none") for m in modes]
        rewards = l1_reward(rollouts.lengths, torch.tensor([n for n, _ in targets], dtype=torch.float64),
                            [kind for _, kind in targets], rollouts.correct, rollouts.format_ok,
                            alpha=c.alpha, alpha_max=c.alpha_max, delta=c.delta)
        return rewards, group_normalized_advantage(rewards, rollouts.group_ids, eps=self.algo.adv_eps)


@dataclass
class TLMRE(_PromptModes):
    """TLMRE (docs/baselines.md, "TLMRE"): standard prompts; correct answers paid by the sigmoid of their
    length's z-score among the prompt's correct answers; leave-one-out advantage, no std; optionally
    whitened over the whole rollout batch (every rank holds all of it)."""

    algo: AlgoConfig
    temperature: float
    name: str = "tlmre"

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.algo.tlmre
        rewards = tlmre_reward(rollouts.lengths, rollouts.correct, rollouts.format_ok, rollouts.group_ids,
                               alpha=c.alpha, std_eps=c.std_eps)
        advantages = rloo_advantage(rewards, rollouts.group_ids)
        if c.batch_whiten:
            tokens = rollouts.response_tokens if rollouts.response_tokens is not None else rollouts.lengths
            advantages = whiten_advantages(advantages, whitening_moments(advantages, tokens))
        return rewards, advantages


@dataclass
class AdaptThink(_PromptModes):
    """AdaptThink (docs/baselines.md, "AdaptThink"): per prompt, round(n f) rollouts forced to start with
    the NoThinking token and the rest with the Thinking token (the forced token belongs to the response,
    with the scheme's probability f or 1 - f as its rollout log-prob); A = acc - R_ref(x) + delta
    1[forced NoThinking], no group statistics; the sequence-ratio loss."""

    algo: AlgoConfig
    temperature: float
    name: str = "adaptthink"
    table: Mapping[str, float] | None = None  # R_ref, from use_reference

    def forced_token_ids(self, prompts: PromptBuilder) -> tuple[int, int]:
        """(NoThinking, Thinking) token ids; each token must be one id, and the Thinking token must open the
        thinking block exactly when the chat template does not."""
        a, c = self.algo, self.algo.adaptthink
        ids = []
        for name, text in (("nothinking_token", c.nothinking_token), ("thinking_token", c.thinking_token)):
            encoded = prompts.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"algo.adaptthink.{name}: {text!r} is {len(encoded)} tokens of this tokenizer, "
                                 "not one; name a single token")
            ids.append(encoded[0])
        template_opens = prompts.text("x").rstrip().endswith(a.think_open)
        if template_opens == (c.thinking_token == a.think_open):
            fix = (f"the chat template opens the thinking block, so it must be a first word of thinking, not "
                   f"{a.think_open!r}") if template_opens else \
                f"the chat template does not open the thinking block, so the Thinking mode opens it: set it to " \
                f"{a.think_open!r}"
            raise ValueError(f"algo.adaptthink.thinking_token: {fix}")
        return ids[0], ids[1]

    def requests(self, prompts: PromptBuilder, problems: Sequence[PromptRow], n_rollouts: int, *,
                 sampling: SamplingSettings, first_group_id: int) -> list[Request]:
        c = self.algo.adaptthink
        token_ids = self.forced_token_ids(prompts)
        modes = assign_modes(n_rollouts, c.nothinking_fraction)
        split = [(nothinking, modes.count(nothinking)) for nothinking in (True, False)]
        requests = []
        for offset, prompt_ids in enumerate(prompts.many([(p.problem, NATURAL) for p in problems])):
            for nothinking, count in split:
                cap = c.nothinking_max_response_length if nothinking else sampling.max_tokens
                ids, max_new = forced_generation_request(prompt_ids, token_ids[0 if nothinking else 1], cap)
                requests.append(Request(prompt_ids=ids, n=count, budget=None, group_id=first_group_id + offset,
                                        sampling=dataclasses.replace(sampling, max_tokens=max_new), mode=NATURAL,
                                        forced_logprob=mode_logprob(nothinking, c.nothinking_fraction)))
        return requests

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        a, c = self.algo, self.algo.adaptthink
        if self.table is None:
            raise RuntimeError("AdaptThink needs R_ref before its first step (Trainer.prepare)")
        if len(rollouts.forced_texts) != len(rollouts.lengths) or not all(rollouts.forced_texts):
            raise ValueError("every AdaptThink rollout starts with a forced mode token; some have none")
        tags = [think_tag_counts(text, think_open=a.think_open, think_close=a.think_close, forced_text=forced)
                for text, forced in zip(rollouts.texts, rollouts.forced_texts)]
        keys = [reference_key(p, lv, c.reference) for p, lv in zip(rollouts.problems, rollouts.levels)]
        rewards = adaptthink_reward(rollouts.correct, rollouts.format_ok, torch.tensor([t[0] for t in tags]),
                                    torch.tensor([t[1] for t in tags]),
                                    torch.tensor([f == c.nothinking_token for f in rollouts.forced_texts]),
                                    lookup_reference_accuracy(self.table, keys), delta=c.delta)
        return rewards, rewards.clone()  # the advantage is the reward itself

    def loss(self) -> PolicyLoss:
        c = self.algo.adaptthink
        return AdaptThinkLoss(temperature=self.temperature, clip_eps_low=c.clip_eps_low,
                              clip_eps_high=c.clip_eps_high)

    def reference(self) -> ReferenceSpec | None:
        c = self.algo.adaptthink
        return ReferenceSpec(samples=c.ref_samples, keyed_by=c.reference,
                             problems_per_level=c.reference_problems_per_level, forced_token=c.thinking_token)

    def use_reference(self, table: Mapping[str, float]) -> None:
        self.table = dict(table)


@dataclass
class SummaryPlan:
    """Phase 2 of one thinking sample: which summary request serves which slots (docs/anytime.md,
    "Rollout procedure"). requests[k] has n = (slots sharing its cut) * A; slots[k] lists those slots in
    order, so its samples go to them in blocks of A. inserted[k]: the request's inserted token count."""

    ending: str
    cuts: list[int]
    requests: list[Request]
    slots: list[list[int]]
    inserted: list[int]


def plan_summaries(prompt_ids: Sequence[int], thinking_ids: Sequence[int], *, budgets: Sequence[int],
                   thinking_budget: int, n_summaries: int, group_id: int, sampling: SamplingSettings,
                   think_end_id: int, eos_id: int, truncation_ids: Sequence[int],
                   final_answer_ids: Sequence[int]) -> SummaryPlan:
    """One request per distinct cut min(b_j, L) of one thinking sample (a prefix shared by k slots is asked for
    once, n = k * n_summaries), its prompt x + z[:c] + inserts built from ids (docs/anytime.md, "Rollout
    procedure"). Training uses the training budgets and A; evaluation any grid and one summary per budget.
    thinking_budget: the generation cap b_m, which tells a cut-off thinking from one that stopped."""
    from megatron_hbpo.algo import anytime

    ending = anytime.thinking_ending(thinking_ids, think_end_id=think_end_id, eos_id=eos_id,
                                     thinking_budget=thinking_budget)
    cuts = anytime.cut_points(len(thinking_ids), budgets)
    requests, slots, inserted = [], [], []
    for cut in dict.fromkeys(cuts):
        shared = [j for j, c in enumerate(cuts) if c == cut]
        ids, n_inserted, _ = anytime.summary_prompt(
            prompt_ids, thinking_ids, cut, ending, truncation_ids=truncation_ids, final_answer_ids=final_answer_ids)
        requests.append(Request(prompt_ids=ids, n=len(shared) * n_summaries, budget=None, sampling=sampling,
                                group_id=group_id, mode=NATURAL))
        slots.append(shared)
        inserted.append(n_inserted)
    return SummaryPlan(ending=ending, cuts=cuts, requests=requests, slots=slots, inserted=inserted)


@dataclass
class Anytime(_PromptModes):
    """AnytimeReasoner / BRPO (docs/anytime.md): two-phase rollouts (thinking stopped at `</think>` or b_m,
    then A forced summaries at each of the m cuts), 0/1 summary rewards, the BRPO thinking advantage per
    budget segment and the decoupled summary advantage, the constant-normaliser clipped loss over packed
    rows. `algo.anytime.preset` selects the paper's named configurations (GRPO baseline included)."""

    algo: AlgoConfig
    temperature: float
    name: str = "anytime"

    def __post_init__(self) -> None:
        from megatron_hbpo.algo import anytime
        from megatron_hbpo.config import anytime_budgets

        self.budgets = anytime_budgets(self.algo.anytime)
        self.prior = anytime.budget_prior(self.algo.anytime.prior, self.budgets)

    @property
    def thinking_budget(self) -> int:
        return self.budgets[-1]

    def thinking_sampling(self, sampling: SamplingSettings, think_end_id: int) -> SamplingSettings:
        """Phase 1: at most b_m tokens, stopping at `</think>` (kept as the last thinking token) or EOS."""
        return dataclasses.replace(sampling, max_tokens=self.thinking_budget, stop_token_ids=(think_end_id,))

    def eval_modes(self) -> list[str]:
        """None: the anytime method is evaluated by acc(b) on a budget grid (components/evaluator.py), not by
        free generation, whose text after `</think>` it never learns (the inserts are context)."""
        return []

    def summary_sampling(self, sampling: SamplingSettings) -> SamplingSettings:
        """Phase 2: the thinking's temperature and top_p, at most summary_max_tokens, only EOS stops."""
        return dataclasses.replace(sampling, max_tokens=self.algo.anytime.summary_max_tokens, stop_token_ids=())

    def summary_plan(self, prompt_ids: Sequence[int], thinking_ids: Sequence[int], *, group_id: int,
                     sampling: SamplingSettings, think_end_id: int, eos_id: int, truncation_ids: Sequence[int],
                     final_answer_ids: Sequence[int]) -> SummaryPlan:
        """Phase 2 of one thinking sample at the training budgets, A summaries per slot (`plan_summaries`)."""
        return plan_summaries(prompt_ids, thinking_ids, budgets=self.budgets, thinking_budget=self.thinking_budget,
                              n_summaries=self.algo.anytime.n_summaries, group_id=group_id, sampling=sampling,
                              think_end_id=think_end_id, eos_id=eos_id, truncation_ids=truncation_ids,
                              final_answer_ids=final_answer_ids)

    def rewards_and_advantages(self, rollouts: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] the prior-weighted return of each thinking sample, [N, m + m * A] its thinking advantage per
        slot followed by its summaries' advantages, slot-major): what AnytimeRecord.policy_sequence packs."""
        from megatron_hbpo.algo import anytime

        c, s = self.algo.anytime, rollouts.anytime
        if s is None:
            raise ValueError("the anytime method scores two-phase rollouts; these records carry no summaries")
        order, shape = _groups(rollouts.group_ids)
        rewards = s.rewards[order].reshape(*shape, *s.rewards.shape[1:])  # [P, G, m, A]
        cuts = s.cuts[order].reshape(*shape, -1)
        rbar = rewards.mean(-1)
        thinking = anytime.thinking_advantage(rbar, self.prior, variance_reduction=c.variance_reduction, lam=c.lam)
        summary = anytime.summary_advantage(rewards, cuts, method=c.summary_method)
        n = len(order)
        out = torch.empty(n, thinking.shape[-1] + summary.shape[-2] * summary.shape[-1], dtype=torch.float64)
        out[order] = torch.cat([thinking.reshape(n, -1), summary.reshape(n, -1)], dim=-1)
        returns = torch.empty(n, dtype=torch.float64)
        returns[order] = (rbar * self.prior).sum(-1).reshape(n)
        return returns, out

    def loss(self) -> PolicyLoss:
        c = self.algo.anytime
        return AnytimeLoss(temperature=self.temperature, clip_eps=c.clip_eps, loss_normalizer=c.loss_normalizer,
                           aggregation=c.loss_aggregation, clip_eps_high=c.clip_eps_high)

    def step_metrics(self, rollouts: ScoredRollouts) -> dict[str, float]:
        """docs/anytime.md "Diagnostics": acc(b), format rate and thinking length per training budget, and the
        variance-reduction diagnostics per slot, over the step's groups."""
        from megatron_hbpo.algo import anytime

        s = rollouts.anytime
        if s is None:
            return {}
        order, shape = _groups(rollouts.group_ids)
        rbar = s.rewards[order].reshape(*shape, *s.rewards.shape[1:]).mean(-1)
        lengths = s.thinking_lengths[order].reshape(shape)
        out = anytime.budget_metrics(s.rewards, s.format_ok, s.cuts, self.budgets)
        out.update(anytime.variance_diagnostics(rbar, self.prior, lengths, self.budgets, lam=self.algo.anytime.lam))
        out["anytime/anytime_accuracy"] = anytime.anytime_accuracy([out[f"anytime/acc_b{b}"] for b in self.budgets])
        return out


def _groups(group_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(indices that sort the samples by prompt group, stably; (prompts, G)): every group must have G."""
    order = torch.argsort(group_ids, stable=True)
    _, counts = torch.unique(group_ids, return_counts=True)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every prompt group needs the same number of thinking samples, got {counts.tolist()}")
    return order, (len(counts), int(counts[0]))


def method_for(algo: AlgoConfig, *, l_max: int, temperature: float) -> Method:
    """The method a recipe's `algo` section names; `l_max` is rollout.max_response_length and
    `temperature` the rollout temperature (the loss takes log-probs at it)."""
    if algo.name == "hbpo":
        return HBPO(algo, l_max, temperature)
    if algo.name == "grpo":
        return GRPO(algo, temperature)
    if algo.name in ("l1_exact", "l1_max"):
        return L1(algo, temperature, name=algo.name)
    if algo.name == "tlmre":
        return TLMRE(algo, temperature)
    if algo.name == "adaptthink":
        return AdaptThink(algo, temperature)
    if algo.name == "anytime":
        return Anytime(algo, temperature)
    raise ValueError(f"algo.name: unknown method {algo.name!r}")
