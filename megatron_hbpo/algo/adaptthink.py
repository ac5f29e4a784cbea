"""AdaptThink baseline: learn per problem whether to think (docs/baselines.md, "AdaptThink").

The mode is the first response token: `</think>` (NoThinking, an empty thinking block) or a common
first word of long thinking, "Alright" (Thinking). Half of each prompt's rollouts are generated with
each token forced, so NoThinking is explored from the first step. The forced token belongs to the
response: it is trained (that is how the mode choice is learned) and counts in L.

    A(x, y) = delta * 1[forced NoThinking] + acc(x, y) - R_ref(x)          (no group statistics)

R_ref(x) is the mean accuracy of the initial model's Thinking responses to x, sampled once before
training. The loss uses one importance ratio per sequence, the ratio of the geometric means of the
response tokens' probabilities, with the first token's old log-prob replaced by its sampling
probability under the forced-token scheme (log 0.5 for a 50/50 split).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_hbpo.algo.constants import ADAPTTHINK_CLIP_EPS as DEFAULT_CLIP_EPS
from megatron_hbpo.algo.constants import ADAPTTHINK_DELTA as DEFAULT_DELTA
from megatron_hbpo.algo.constants import ADAPTTHINK_NOTHINKING_FRACTION as DEFAULT_NOTHINKING_FRACTION
from megatron_hbpo.algo.constants import ADAPTTHINK_NOTHINKING_TOKEN as NOTHINKING_TOKEN
from megatron_hbpo.algo.constants import ADAPTTHINK_THINKING_TOKEN as THINKING_TOKEN
from megatron_hbpo.algo.constants import THINK_OPEN
from megatron_hbpo.algo.loss import MAX_LOG_RATIO, LossBatch, LossOutput, clipped_policy_loss
from megatron_hbpo.algo.reward import float_dtype, per_sample_tensors

# The authors' settings (docs/baselines.md, "AdaptThink") are defined once, in algo/constants.py; the
# recipe's checks of them are config.AdaptThinkConfig's.
# The two forced tokens' ids in the DeepSeek-R1-Distill-Qwen tokenizer, for checking a tokenizer's
# single-token encoding of the strings above.
R1_DISTILL_QWEN_TOKEN_IDS = {NOTHINKING_TOKEN: 151649, THINKING_TOKEN: 71486}


# -- modes and the forced first token -----------------------------------------------------------------


def assign_modes(n_rollouts: int, nothinking_fraction: float = DEFAULT_NOTHINKING_FRACTION) -> list[bool]:
    """Whether each of one prompt's n rollouts is forced NoThinking: round(n * fraction) NoThinking
    rollouts first, then the Thinking ones (Python's round, as in the authors' rollout)."""
    if n_rollouts < 1:
        raise ValueError(f"n_rollouts must be >= 1, got {n_rollouts}")
    n_nothinking = round(n_rollouts * nothinking_fraction)
    return [True] * n_nothinking + [False] * (n_rollouts - n_nothinking)


def mode_logprob(forced_nothinking: bool, nothinking_fraction: float = DEFAULT_NOTHINKING_FRACTION) -> float:
    """log of the probability with which the sampling scheme picks this first token (log 0.5 for 50/50)."""
    p = nothinking_fraction if forced_nothinking else 1.0 - nothinking_fraction
    if not 0 < p <= 1:
        raise ValueError(f"nothinking_fraction={nothinking_fraction} never forces this mode")
    return math.log(p)


def forced_generation_request(prompt_ids: Sequence[int], forced_token_id: int, response_cap: int
                              ) -> tuple[list[int], int]:
    """What the rollout engine generates from: (prompt ids + the forced token, max new tokens).

    The forced token counts toward the mode's response cap, so the engine may add cap - 1 tokens.
    """
    if response_cap < 2:
        raise ValueError(f"a forced-first-token response cap must be >= 2 (the forced token and one more), "
                         f"got {response_cap}")
    return [*prompt_ids, forced_token_id], response_cap - 1


def forced_rollout(
    prompt_ids: Sequence[int],
    forced_token_id: int,
    generated_ids: Sequence[int],
    generated_logprobs: Sequence[float] | None = None,
    *,
    forced_logprob: float,
) -> tuple[list[int], int, list[float] | None]:
    """A forced-first-token rollout as the trainer sees it: (tokens, prompt_length, response log-probs).

    tokens = prompt + forced token + generated; the prompt ends before the forced token, so the
    forced token is the first response token, carries loss and counts in L = len(tokens) -
    prompt_length. The response's rollout log-probs start with `forced_logprob` (`mode_logprob`:
    what the sampling scheme gave that token), followed by the engine's own.
    """
    if generated_logprobs is not None and len(generated_logprobs) != len(generated_ids):
        raise ValueError(f"{len(generated_logprobs)} log-probs for {len(generated_ids)} generated tokens")
    tokens = [*prompt_ids, forced_token_id, *generated_ids]
    logprobs = None if generated_logprobs is None else [forced_logprob, *generated_logprobs]
    return tokens, len(prompt_ids), logprobs


def think_tag_counts(response_text: str, *, think_open: str = THINK_OPEN, think_close: str = NOTHINKING_TOKEN,
                     forced_text: str = "") -> tuple[int, int]:
    """(occurrences of `<think>`, occurrences of `</think>`) in a response decoded with its forced token.

    forced_text: the forced first token's text. A `<think>` in it is not counted: forcing `<think>`
    opens the thinking block where the chat template does not (a model that opens the block itself,
    like the synthetic task's), the same block an R1 template opens in the prompt. A forced `</think>`
    counts: it is the one closing tag a NoThinking response may have.
    """
    return response_text.count(think_open) - forced_text.count(think_open), response_text.count(think_close)


def is_nothinking(response_text: str, *, think_close: str = NOTHINKING_TOKEN, think_open: str = THINK_OPEN) -> bool:
    """Evaluation: the model chose NoThinking, i.e. its response opens with `</think>`, or with an empty
    `<think></think>` block where the model opens the block itself (the synthetic task's)."""
    text = response_text.lstrip()
    if text.startswith(think_open):
        text = text[len(think_open):].lstrip()
    return text.startswith(think_close)


# -- reward, advantage and R_ref --------------------------------------------------------------------


def adaptthink_accuracy(
    correct: torch.Tensor, format_ok: torch.Tensor, n_think_open: torch.Tensor, n_think_close: torch.Tensor
) -> torch.Tensor:
    """[N] bool: correct, well formed, no `<think>` and exactly one `</think>` in the response.

    The one-`</think>` rule stops a model from collecting the NoThinking bonus by writing `</think>`
    first and thinking after it.
    """
    correct, format_ok, n_open, n_close = per_sample_tensors(
        "adaptthink_accuracy", correct=correct, format_ok=format_ok, n_think_open=n_think_open,
        n_think_close=n_think_close)
    return correct.bool() & format_ok.bool() & (n_open == 0) & (n_close == 1)


def adaptthink_reward(
    correct: torch.Tensor,
    format_ok: torch.Tensor,
    n_think_open: torch.Tensor,
    n_think_close: torch.Tensor,
    forced_nothinking: torch.Tensor,
    r_ref: torch.Tensor,
    *,
    delta: float = DEFAULT_DELTA,
) -> torch.Tensor:
    """acc - R_ref(x) + delta * 1[forced NoThinking], one per sample; this is also the advantage.

    Args (1-D, one entry per sample): correct, format_ok (bool; truncation folded in as a format
    error), n_think_open / n_think_close (`think_tag_counts` of the response with its forced token),
    forced_nothinking (bool, the mode the sample was forced into, not read from text), r_ref (the
    prompt's reference accuracy). Returns the widest floating dtype of r_ref, else the default dtype.
    """
    *tags, forced, r_ref = per_sample_tensors(
        "adaptthink_reward", correct=correct, format_ok=format_ok, n_think_open=n_think_open,
        n_think_close=n_think_close, forced_nothinking=forced_nothinking, r_ref=r_ref)
    acc = adaptthink_accuracy(*tags)
    dtype = float_dtype(r_ref)
    return acc.to(dtype) - r_ref.to(dtype) + delta * forced.bool().to(dtype)


def reference_accuracy(
    problem_keys: Sequence[Hashable], accuracy: Sequence[float], *, samples_per_problem: int | None = None
) -> dict[Hashable, float]:
    """R_ref table: the mean accuracy of each problem's reference (initial model, Thinking) samples.

    problem_keys[i] names the problem of sample i; accuracy[i] is its `adaptthink_accuracy` (0/1).
    samples_per_problem: K, when every problem must have exactly K samples.
    """
    if len(problem_keys) != len(accuracy):
        raise ValueError(f"{len(problem_keys)} problem keys for {len(accuracy)} accuracies")
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for key, acc in zip(problem_keys, accuracy):
        sums[key] = sums.get(key, 0.0) + float(acc)
        counts[key] = counts.get(key, 0) + 1
    if samples_per_problem is not None:
        wrong = [(k, c) for k, c in counts.items() if c != samples_per_problem]
        if wrong:
            raise ValueError(f"R_ref needs {samples_per_problem} samples per problem; {len(wrong)} problem(s) "
                             f"have another count, e.g. {wrong[:3]!r}")
    return {key: sums[key] / counts[key] for key in sums}


def reference_key(problem: str, level: str | None, keyed_by: str) -> str:
    """The R_ref table's key of a problem: its text ("problem"), or its difficulty level ("level",
    where the problems are an endless stream: the synthetic task, docs/baselines.md)."""
    if keyed_by == "problem":
        return problem
    if keyed_by == "level":
        if level is None:
            raise ValueError("R_ref per level needs every problem's level; this problem has none: "
                             f"{problem[:80]!r}")
        return f"level:{level}"
    raise ValueError(f"R_ref is keyed by 'problem' or 'level', got {keyed_by!r}")


def lookup_reference_accuracy(table: Mapping[Any, float], problem_keys: Sequence[Hashable]) -> torch.Tensor:
    """[N] float64 R_ref of each sample's problem; ValueError naming problems the table lacks."""
    missing = list(dict.fromkeys(k for k in problem_keys if k not in table))
    if missing:
        raise ValueError(f"no reference accuracy R_ref for {len(missing)} problem(s), e.g. {missing[:3]!r}: "
                         "the reference pass must cover every training problem, keyed the same way")
    return torch.tensor([float(table[k]) for k in problem_keys], dtype=torch.float64)


# -- the sequence-level loss ------------------------------------------------------------------------


@dataclass
class SequenceLossOutput:
    """Sums over the sequences of one shard; divide by the global sequence count to get the loss."""

    loss_sum: torch.Tensor  # scalar, differentiable
    num_sequences: torch.Tensor  # scalar, sequences with at least one response token
    clipped_sequences: torch.Tensor  # sequences where the clipped branch is active (gradient cut)
    ratio_sum: torch.Tensor  # sum of the per-sequence ratios, for their mean (no grad)


def adaptthink_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    forced_nothinking: torch.Tensor,
    *,
    clip_eps_low: float = DEFAULT_CLIP_EPS,
    clip_eps_high: float = DEFAULT_CLIP_EPS,
    nothinking_fraction: float = DEFAULT_NOTHINKING_FRACTION,
) -> SequenceLossOutput:
    """Clipped surrogate with one length-normalised ratio per sequence, summed over sequences.

        logp_old[first response token] = log P(forced mode)       (log 0.5 for 50/50, both modes)
        rho  = exp(mean_t logp_new - mean_t logp_old)             over the sequence's response tokens
        loss = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))      no dual clip

    A per-token ratio (or the paper's literal sequence ratio) on the forced token would be about
    pi_theta(token) / 0.5, tiny for an unlikely mode, and would stop its gradient; averaging the
    log-ratio over the sequence keeps rho near 1 and gives every token, the forced one included, a
    weight of about A / |y| (docs/baselines.md, "AdaptThink", loss).

    Args:
        logp_new: [B, T] log-probs of the taken tokens under the policy being trained.
        logp_old: [B, T] the trainer's log-probs before the update (no grad); the first response
            position is overwritten here, so pass what the trainer computed for the forced token.
        advantages: [B] one per sequence (`adaptthink_reward`).
        response_mask: [B, T] True on response tokens, the forced first token included.
        forced_nothinking: [B] bool, the mode each sequence was forced into.
    Returns sums over this shard: mean over the global batch = all-reduced loss_sum / num_sequences,
    so data-parallel and micro-batch splits give the same gradient.
    """
    batch = logp_new.shape[:1]
    if forced_nothinking.shape != batch:
        raise ValueError(f"forced_nothinking {tuple(forced_nothinking.shape)} must have one entry per sequence "
                         f"{tuple(batch)}")
    forced_logp = torch.where(forced_nothinking.bool().to(logp_new.device),
                              logp_new.new_tensor(mode_logprob(True, nothinking_fraction)),
                              logp_new.new_tensor(mode_logprob(False, nothinking_fraction)))
    return sequence_ratio_loss(logp_new, logp_old, advantages, response_mask, forced_logp,
                               clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)


def sequence_ratio_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    first_logp_old: torch.Tensor,
    *,
    clip_eps_low: float = DEFAULT_CLIP_EPS,
    clip_eps_high: float = DEFAULT_CLIP_EPS,
) -> SequenceLossOutput:
    """`adaptthink_policy_loss` with the first response token's old log-prob given per sequence:
    first_logp_old [B] is the probability with which the sampling scheme chose that token (the
    trainer takes it from the rollout log-probs, where the worker put log P(forced mode))."""
    if logp_new.shape != logp_old.shape or logp_new.shape != response_mask.shape or logp_new.dim() != 2:
        raise ValueError(f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have one [B, T] shape")
    batch = logp_new.shape[:1]
    if advantages.shape != batch or first_logp_old.shape != batch:
        raise ValueError(f"advantages {tuple(advantages.shape)} and the first tokens' old log-probs "
                         f"{tuple(first_logp_old.shape)} must have one entry per sequence {tuple(batch)}")
    mask = response_mask.bool()
    zero = torch.zeros_like(logp_new)
    first = mask & (mask.cumsum(-1) == 1)
    forced = first_logp_old.detach().to(logp_new.dtype).unsqueeze(-1).expand_as(logp_new)
    old = torch.where(first, forced, logp_old.detach())

    num_tokens = mask.sum(-1)
    has_tokens = num_tokens > 0
    denominator = num_tokens.clamp(min=1).to(logp_new.dtype)
    mean_new = torch.where(mask, logp_new, zero).sum(-1) / denominator
    mean_old = torch.where(mask, old, zero).sum(-1) / denominator
    # The clipped surrogate of one token per sequence, that token's log-probs being the sequence's
    # means; no dual clip, as in the authors' loss.
    out = clipped_policy_loss(mean_new.unsqueeze(-1), mean_old.unsqueeze(-1), advantages, has_tokens.unsqueeze(-1),
                              clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip_c=math.inf)
    ratio = torch.exp((mean_new - mean_old).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return SequenceLossOutput(
        loss_sum=out.loss_sum,
        num_sequences=out.num_tokens,
        clipped_sequences=out.clipped_tokens,
        ratio_sum=torch.where(has_tokens, ratio, torch.zeros_like(ratio)).sum(),
    )


@dataclass(frozen=True)
class AdaptThinkLoss:
    """AdaptThink's objective as the policy's training step takes it (algo.loss.PolicyLoss):
    `sequence_ratio_loss`, mean over the mini-batch's sequences (normaliser: the sequence count, which
    Megatron all-reduces over micro-batches and data-parallel ranks). The forced first token's old
    log-prob is its rollout log-prob, log P(forced mode): the worker records it there, and nothing
    else about the sample says which token was forced. No KL, entropy or truncated importance term.

    metrics: "clip_fraction" (clipped sequences) and "ratio" (the sequence ratio rho), both per sequence.
    """

    temperature: float
    clip_eps_low: float = DEFAULT_CLIP_EPS
    clip_eps_high: float = DEFAULT_CLIP_EPS
    needs_logp_old: bool = True
    metric_names: tuple[str, ...] = ("clip_fraction", "ratio")

    def __call__(self, logp: torch.Tensor, batch: LossBatch) -> LossOutput:
        assert batch.logp_old is not None and batch.logp_rollout is not None  # every RL sequence carries both
        mask = batch.response_mask.bool()
        first = mask & (mask.cumsum(-1) == 1)
        first_logp_old = torch.where(first, batch.logp_rollout, torch.zeros_like(batch.logp_rollout)).sum(-1)
        out = sequence_ratio_loss(logp, batch.logp_old, batch.advantages, batch.response_mask, first_logp_old,
                                  clip_eps_low=self.clip_eps_low, clip_eps_high=self.clip_eps_high)
        return LossOutput(loss_sum=out.loss_sum, normalizer=out.num_sequences,
                          metrics={"clip_fraction": out.clipped_sequences, "ratio": out.ratio_sum})
