"""AnytimeReasoner / BRPO (arXiv 2505.13438) as pure functions; the method is written up in docs/anytime.md.

A prompt's G thinking samples are each cut at m budgets b_1 < ... < b_m; A forced summaries are drawn at
every cut and scored 0/1. From those rewards come two advantages: one per (sample, budget slot) for the
thinking tokens (dense returns, BRPO baseline) and one per summary for the summary tokens (GRPO within
the summaries that share a prefix). Slots are 0-based in code and 1-based in docs/anytime.md.

Nothing here knows about processes, engines or models: the caller generates, verifies and packs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from megatron_hbpo.algo.constants import (
    ANYTIME_INSERT_ALLOWANCE,
    ANYTIME_LAM,
    ANYTIME_LOSS_NORMALIZER,
    ANYTIME_N_BUDGETS,
    ANYTIME_N_SUMMARIES,
    ANYTIME_PRESET_FIELDS,
    ANYTIME_PRESETS,
    ANYTIME_SUMMARY_MAX_TOKENS,
    ANYTIME_THINKING_BUDGET,
)
from megatron_hbpo.algo.verify import extract_boxed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUDGET_PRIORS = ("base", "uniform", "linear")
VARIANCE_REDUCTIONS = ("brpo", "v2only", "v1only", "none")
SUMMARY_METHODS = ("brpo", "grpo")
ENDINGS = ("ended", "cut_off", "eos")

THINK_END = "</think>"
TRUNCATION_TEXT = "...\n\n...\n\n"  # followed by the `</think>` token
FINAL_ANSWER_HEADER = "**Final Answer**\n"
FINAL_ANSWER_INSERT = "\n\n" + FINAL_ANSWER_HEADER

DEFAULT_THINKING_BUDGET = ANYTIME_THINKING_BUDGET
DEFAULT_N_BUDGETS = ANYTIME_N_BUDGETS
DEFAULT_N_SUMMARIES = ANYTIME_N_SUMMARIES
DEFAULT_SUMMARY_MAX_TOKENS = ANYTIME_SUMMARY_MAX_TOKENS
DEFAULT_LAM = ANYTIME_LAM
DEFAULT_LOSS_NORMALIZER = ANYTIME_LOSS_NORMALIZER
INSERT_ALLOWANCE = ANYTIME_INSERT_ALLOWANCE

EVAL_BUDGET_STEP = 250
TRAINING_EVAL_BUDGETS = (2000, 4000, 6000, 8000)

FIELD = "algo.anytime."

# The configurations of docs/anytime.md ("Named configurations"), as algo.anytime field values.
PRESET_FIELDS = ANYTIME_PRESET_FIELDS
PRESETS: dict[str, dict[str, Any]] = ANYTIME_PRESETS


def _check_choice(value: str, choices: Sequence[str], field: str) -> None:
    if value not in choices:
        raise ValueError(f"{FIELD}{field}: unknown {value!r}; choose one of {', '.join(choices)}")


def _check_lam(lam: float) -> None:
    if not 0 < lam <= 1:
        raise ValueError(f"{FIELD}lam: must be in (0, 1], got {lam}")


# --------------------------------------------------------------------------------------------------
# Budgets, priors, cuts
# --------------------------------------------------------------------------------------------------


def training_budgets(thinking_budget: int, n_budgets: int | None, budgets: Sequence[int] | None = None) -> list[int]:
    """The budget support b_1 < ... < b_m.

    Without an explicit list: b_j = j * thinking_budget / n_budgets. With one (`budgets`), it must be
    strictly increasing, positive and end at `thinking_budget`; `n_budgets` is then either None or its
    length. Errors name the algo.anytime field to fix.
    """
    if thinking_budget < 1:
        raise ValueError(f"{FIELD}thinking_budget: must be >= 1, got {thinking_budget}")
    if budgets is not None:
        budgets = [int(b) for b in budgets]
        if not budgets:
            raise ValueError(f"{FIELD}budgets: must list at least one budget or be null")
        if budgets[0] < 1 or any(x >= y for x, y in itertools.pairwise(budgets)):
            raise ValueError(f"{FIELD}budgets: must be positive and strictly increasing, got {budgets}")
        # Thinking is generated up to the last budget; a different b_m would leave tokens in no slot.
        if budgets[-1] != thinking_budget:
            raise ValueError(f"{FIELD}budgets: the last budget {budgets[-1]} must equal "
                             f"{FIELD}thinking_budget={thinking_budget}")
        if n_budgets is not None and n_budgets != len(budgets):
            raise ValueError(f"{FIELD}n_budgets: {n_budgets} does not match the {len(budgets)} budgets "
                             f"{budgets}; set it to {len(budgets)} or null")
        return budgets
    if n_budgets is None or n_budgets < 1:
        raise ValueError(f"{FIELD}n_budgets: must be >= 1, got {n_budgets}")
    if thinking_budget % n_budgets:
        raise ValueError(f"{FIELD}n_budgets: {n_budgets} does not divide {FIELD}thinking_budget={thinking_budget}; "
                         f"choose a divisor or list {FIELD}budgets explicitly")
    step = thinking_budget // n_budgets
    return [step * j for j in range(1, n_budgets + 1)]


def budget_prior(kind: str, budgets: Sequence[int]) -> torch.Tensor:
    """The thinking policy's prior P over the budgets: float64 [m], sums to 1.

    base: all mass on b_m; uniform: 1/m; linear: b_j / sum_k b_k.
    """
    _check_choice(kind, BUDGET_PRIORS, "prior")
    m = len(budgets)
    if m < 1:
        raise ValueError("budget_prior: needs at least one budget")
    if kind == "base":
        prior = torch.zeros(m, dtype=torch.float64)
        prior[-1] = 1.0
        return prior
    if kind == "uniform":
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    b = torch.tensor([float(x) for x in budgets], dtype=torch.float64)
    return b / b.sum()


def cut_points(length: int, budgets: Sequence[int]) -> list[int]:
    """c_j = min(b_j, L): where slot j's summaries see the thinking of length L stop."""
    return [min(int(b), int(length)) for b in budgets]


def thinking_segments(length: int, budgets: Sequence[int]) -> list[tuple[int, int]]:
    """Token range [start, end) of each slot's thinking segment; (start, start) when empty.

    Token t (0-based) is in slot s when b_{s-1} <= t < b_s, b_0 = 0; slots past the end own nothing.
    """
    bounds = [0] + cut_points(length, budgets)
    return [(bounds[s], bounds[s + 1]) for s in range(len(budgets))]


def thinking_token_advantage(length: int, budgets: Sequence[int], advantages: torch.Tensor) -> torch.Tensor:
    """Per-token advantage [L] of one sample's thinking: token t gets the advantage of its slot.

    advantages: [m], the sample's row of `thinking_advantage`. L may not exceed b_m.
    """
    advantages = torch.as_tensor(advantages)
    if advantages.shape != (len(budgets),):
        raise ValueError(f"advantages must have shape ({len(budgets)},), got {tuple(advantages.shape)}")
    if not 0 <= length <= budgets[-1]:
        raise ValueError(f"thinking length {length} is outside [0, b_m={budgets[-1]}]")
    bounds = torch.tensor(list(budgets), dtype=torch.long)
    slots = torch.searchsorted(bounds, torch.arange(length), right=True)
    return advantages[slots]


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def _returns_and_baselines(
    rbar: torch.Tensor, prior: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R, V1, V2 of docs/anytime.md ("Thinking advantage"), each [..., G, m]; the prior is renormalised."""
    rbar = torch.as_tensor(rbar)
    prior = torch.as_tensor(prior)
    if not rbar.is_floating_point():
        raise ValueError(f"rbar must be a floating tensor, got {rbar.dtype}")
    if rbar.dim() < 2 or prior.dim() != 1 or rbar.shape[-1] != prior.shape[0]:
        raise ValueError(f"rbar must be [..., G, m] and prior [m], got {tuple(rbar.shape)} and {tuple(prior.shape)}")
    _check_lam(lam)
    dtype = torch.promote_types(rbar.dtype, prior.dtype) if prior.is_floating_point() else rbar.dtype
    rbar, prior = rbar.to(dtype), prior.to(dtype)
    if (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"{FIELD}prior: must be non-negative and not all zero, got {prior.tolist()}")
    prior = prior / prior.sum()
    m, G = prior.shape[0], rbar.shape[-2]

    # Suffix sums: the return from slot s on, and the prior mass it covers.
    returns = (rbar * prior).flip(-1).cumsum(-1).flip(-1)
    tail = prior.flip(0).cumsum(0).flip(0)
    # A lone sample has no group to compare with; its V2 would be its own return (advantage 0).
    v2 = returns.mean(-2, keepdim=True).expand_as(returns) if G > 1 else torch.zeros_like(returns)

    s = torch.arange(m)
    gap = (s[:, None] - s[None, :]).to(dtype)
    weights = torch.where(s[None, :] < s[:, None], torch.tensor(lam, dtype=dtype) ** gap, torch.zeros((), dtype=dtype))
    norm = weights.sum(-1)
    # Slot 1 has no earlier rewards: V1 = 0 there (norm 0, clamped to avoid 0/0).
    earlier = (rbar @ weights.T) / norm.clamp(min=torch.finfo(dtype).tiny)
    v1 = earlier * tail
    return returns, v1, v2


def _brpo_baseline(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """((s-1)/m) V1 + ((m-s+1)/m) V2 for 1-based s: trust the own-prefix baseline more at later slots."""
    m = v1.shape[-1]
    w1 = torch.arange(m, dtype=v1.dtype) / m
    return w1 * v1 + (1 - w1) * v2


def thinking_advantage(
    rbar: torch.Tensor, prior: torch.Tensor, *, variance_reduction: str = "brpo", lam: float = DEFAULT_LAM
) -> torch.Tensor:
    """A^think = R - V for every (sample, slot): [G, m] (leading batch dims allowed: [..., G, m]).

    rbar: [G, m], mean summary reward of each slot's own A summaries; prior: [m], renormalised here.
    variance_reduction picks V: brpo (mix of V1 and V2), v2only (group mean), v1only, none (V = 0).
    No std division and no eps.
    """
    _check_choice(variance_reduction, VARIANCE_REDUCTIONS, "variance_reduction")
    returns, v1, v2 = _returns_and_baselines(rbar, prior, lam)
    if variance_reduction == "brpo":
        return returns - _brpo_baseline(v1, v2)
    if variance_reduction == "v2only":
        return returns - v2
    if variance_reduction == "v1only":
        return returns - v1
    return returns


def summary_advantage(rewards: torch.Tensor, cuts: torch.Tensor, *, method: str = "brpo") -> torch.Tensor:
    """A^sum for every summary: [G, m, A] (leading batch dims allowed: [..., G, m, A]).

    rewards: [G, m, A] in {0, 1}; cuts: [G, m], the cut c_{g,j} of each slot.
    brpo, A >= 2: r minus the mean of all summaries of the same sample at the same cut (k * A of them when k
    slots share it). brpo, A = 1: r minus the group mean at the same slot. grpo (A = 1 only): slot m gets
    r minus the group mean, every other slot 0.
    """
    rewards, cuts = torch.as_tensor(rewards), torch.as_tensor(cuts)
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if rewards.dim() < 3 or cuts.shape != rewards.shape[:-1]:
        raise ValueError(f"rewards must be [..., G, m, A] and cuts [..., G, m], got {tuple(rewards.shape)} "
                         f"and {tuple(cuts.shape)}")
    _check_choice(method, SUMMARY_METHODS, "summary_method")
    n_summaries = rewards.shape[-1]
    if method == "grpo":
        if n_summaries != 1:
            raise ValueError(f"{FIELD}summary_method: grpo trains one summary per sample and needs "
                             f"{FIELD}n_summaries=1, got A={n_summaries}")
        adv = torch.zeros_like(rewards)
        last = rewards[..., -1, :]  # [..., G, 1]
        adv[..., -1, :] = last - last.mean(-2, keepdim=True)
        return adv
    if n_summaries == 1:
        return rewards - rewards.mean(-3, keepdim=True)
    same_cut = (cuts.unsqueeze(-1) == cuts.unsqueeze(-2)).to(rewards.dtype)  # [..., G, m, m]
    group_sum = (same_cut @ rewards.sum(-1, keepdim=True)).squeeze(-1)
    group_mean = group_sum / (same_cut.sum(-1) * n_summaries)
    return rewards - group_mean.unsqueeze(-1)


# --------------------------------------------------------------------------------------------------
# Summary prompts and rewards
# --------------------------------------------------------------------------------------------------


def thinking_ending(thinking_ids: Sequence[int], *, think_end_id: int, eos_id: int, thinking_budget: int) -> str:
    """How a thinking sample stopped: "ended" (last token `</think>`), "eos", or "cut_off" (hit b_m)."""
    if not thinking_ids:
        raise ValueError("a thinking sample has at least one token")
    last = thinking_ids[-1]
    if last == think_end_id:
        return "ended"
    if last == eos_id:
        return "eos"
    if len(thinking_ids) != thinking_budget:
        raise ValueError(f"thinking of {len(thinking_ids)} tokens ends with neither `</think>` nor EOS and is "
                         f"not at the thinking budget {thinking_budget}: the engine stopped it for another reason")
    return "cut_off"


def is_natural_end(cut: int, length: int, ending: str) -> bool:
    """Only a sample that closed its thinking, seen whole, skips the truncation insert."""
    if ending not in ENDINGS:
        raise ValueError(f"ending must be one of {', '.join(ENDINGS)}, got {ending!r}")
    return ending == "ended" and cut == length


def summary_prompt(
    prompt_ids: Sequence[int],
    thinking_ids: Sequence[int],
    cut: int,
    ending: str,
    *,
    truncation_ids: Sequence[int],
    final_answer_ids: Sequence[int],
) -> tuple[list[int], int, bool]:
    """The token-level prompt of the summaries at cut c: (ids, number of inserted ids, truncated).

    natural end: x + z + final_answer_ids; otherwise x + z[:c] + truncation_ids + final_answer_ids.
    The inserts are appended as ids, so a cut inside a word never merges with them.
    """
    length = len(thinking_ids)
    if not 1 <= cut <= length:
        raise ValueError(f"cut {cut} is outside [1, {length}]")
    truncated = not is_natural_end(cut, length, ending)
    inserted = [*truncation_ids, *final_answer_ids] if truncated else list(final_answer_ids)
    return [*prompt_ids, *thinking_ids[:cut], *inserted], len(inserted), truncated


def think_end_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Id of `</think>` when the tokenizer has it as one token (R1-Distill: 151649), else None."""
    token_id = tokenizer.get_vocab().get(THINK_END)
    return None if token_id is None else int(token_id)


def summary_insert_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(truncation_ids, final_answer_ids): the two inserted strings tokenized on their own.

    `</think>` is the tokenizer's own token when it has one, so the summary sees the same closing token
    as a naturally ended thinking; otherwise it is plain text.
    """
    think_end_id = think_end_token_id(tokenizer)
    if think_end_id is None:
        truncation = tokenizer.encode(TRUNCATION_TEXT + THINK_END, add_special_tokens=False)
    else:
        truncation = [*tokenizer.encode(TRUNCATION_TEXT, add_special_tokens=False), think_end_id]
    return list(truncation), list(tokenizer.encode(FINAL_ANSWER_INSERT, add_special_tokens=False))


def summary_text(tokenizer: PreTrainedTokenizerBase, inserted_ids: Sequence[int], summary_ids: Sequence[int], *,
                 eos_id: int) -> str:
    """Decoded inserted tokens + generated summary, trailing EOS dropped: the text answers are read from."""
    ids = list(summary_ids)
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    # Special tokens stay: a decoded `</think>` then sits in its own "\n\n" piece, as in the released code.
    return tokenizer.decode([*inserted_ids, *ids], skip_special_tokens=False)


def extract_summary_answer(text: str) -> str | None:
    """The last `\\boxed{}` of the first "\\n\\n"-separated piece that starts with "**Final Answer**\\n".

    Anything after the summary's first blank line is ignored, so a box written later does not count.
    """
    for piece in text.split("\n\n"):
        if piece.startswith(FINAL_ANSWER_HEADER):
            return extract_boxed(piece[len(FINAL_ANSWER_HEADER):])
    return None


def summary_rewards(correct: Any, *, prefix_ends_with_eos: Any, summary_has_think_end: Any) -> torch.Tensor:
    """0/1 reward of each summary (float64, the broadcast shape of the inputs).

    correct: the verifier's verdict on the extracted answer (False when none was extracted).
    A thinking prefix that ends with EOS, or a summary that writes a second `</think>`, scores 0.
    """
    correct = torch.as_tensor(correct, dtype=torch.bool)
    eos = torch.as_tensor(prefix_ends_with_eos, dtype=torch.bool)
    think_end = torch.as_tensor(summary_has_think_end, dtype=torch.bool)
    return (correct & ~eos & ~think_end).to(torch.float64)


# --------------------------------------------------------------------------------------------------
# Diagnostics and evaluation
# --------------------------------------------------------------------------------------------------


def _variance_ratio(returns: torch.Tensor, baseline: torch.Tensor) -> float | None:
    if returns.numel() < 2:
        return None
    var = returns.var(unbiased=False)
    if var <= 0:
        return None
    return float((returns - baseline).var(unbiased=False) / var)


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    if x.numel() < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = torch.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denom <= 0:
        return None
    return float((dx * dy).sum() / denom)


def variance_diagnostics(
    rbar: torch.Tensor, prior: torch.Tensor, lengths: torch.Tensor, budgets: Sequence[int], *, lam: float = DEFAULT_LAM
) -> dict[str, float]:
    """How much each baseline reduces the variance of the thinking return, per slot.

    rbar: [..., G, m] (e.g. [prompts, G, m]); lengths: [..., G] thinking lengths. For slot s (1-based
    in the keys), over the samples whose segment s is non-empty (L > b_{s-1}):
      anytime/diag_samples_s{s}        how many samples that is (always present),
      anytime/var_ratio_{v1only,v2only,brpo}_s{s}   Var[R - V] / Var[R],
      anytime/corr_v1_s{s}, anytime/corr_v2_s{s}    Pearson Corr[V, R].
    A ratio is left out when Var[R] = 0 (fewer than two samples or equal returns), a correlation when
    either side has no spread (V1 at s = 1, V2 with G = 1): never NaN, never a made-up 0.
    """
    returns, v1, v2 = _returns_and_baselines(rbar, prior, lam)
    lengths = torch.as_tensor(lengths)
    if lengths.shape != returns.shape[:-1]:
        raise ValueError(f"lengths must be [..., G] matching rbar {tuple(returns.shape)}, got {tuple(lengths.shape)}")
    brpo = _brpo_baseline(v1, v2)
    starts = [0, *budgets[:-1]]
    out: dict[str, float] = {}
    for s, start in enumerate(starts):
        keep = lengths > start
        r = returns[..., s][keep]
        out[f"anytime/diag_samples_s{s + 1}"] = float(r.numel())
        values = {
            f"var_ratio_v1only_s{s + 1}": _variance_ratio(r, v1[..., s][keep]),
            f"var_ratio_v2only_s{s + 1}": _variance_ratio(r, v2[..., s][keep]),
            f"var_ratio_brpo_s{s + 1}": _variance_ratio(r, brpo[..., s][keep]),
            f"corr_v1_s{s + 1}": _correlation(v1[..., s][keep], r),
            f"corr_v2_s{s + 1}": _correlation(v2[..., s][keep], r),
        }
        out.update({f"anytime/{k}": v for k, v in values.items() if v is not None and math.isfinite(v)})
    return out


def budget_metrics(
    rewards: torch.Tensor, format_ok: torch.Tensor, cuts: torch.Tensor, budgets: Sequence[int]
) -> dict[str, float]:
    """Per budget b: acc(b), format rate and mean thinking length seen (mean cut), keyed by b.

    rewards, format_ok: [..., m, A]; cuts: [..., m]. Keys: anytime/acc_b{b}, anytime/format_rate_b{b},
    anytime/think_len_b{b}.
    """
    rewards, format_ok, cuts = (torch.as_tensor(t) for t in (rewards, format_ok, cuts))
    if rewards.shape != format_ok.shape or cuts.shape != rewards.shape[:-1] or cuts.shape[-1] != len(budgets):
        raise ValueError(f"rewards/format_ok must be [..., m, A] and cuts [..., m] with m={len(budgets)}, got "
                         f"{tuple(rewards.shape)}, {tuple(format_ok.shape)}, {tuple(cuts.shape)}")
    out: dict[str, float] = {}
    for j, b in enumerate(budgets):
        out[f"anytime/acc_b{b}"] = float(rewards[..., j, :].to(torch.float64).mean())
        out[f"anytime/format_rate_b{b}"] = float(format_ok[..., j, :].to(torch.float64).mean())
        out[f"anytime/think_len_b{b}"] = float(cuts[..., j].to(torch.float64).mean())
    return out


def evaluation_budgets(max_budget: int = DEFAULT_THINKING_BUDGET, step: int = EVAL_BUDGET_STEP) -> list[int]:
    """The final-evaluation grid step, 2*step, ..., max_budget (default 250..8000, 32 budgets)."""
    if step < 1 or max_budget < step or max_budget % step:
        raise ValueError(f"evaluation budgets need 1 <= step <= max_budget and step dividing max_budget, "
                         f"got step={step}, max_budget={max_budget}")
    return list(range(step, max_budget + 1, step))


def anytime_accuracy(acc: Mapping[int, float] | Sequence[float], budgets: Sequence[int] | None = None) -> float:
    """Plain mean of acc(b): over all given values, or over `budgets` when acc is keyed by budget."""
    if isinstance(acc, Mapping):
        if budgets is not None:
            missing = [b for b in budgets if b not in acc]
            if missing:
                raise ValueError(f"no accuracy for budgets {missing}")
            values = [acc[b] for b in budgets]
        else:
            values = list(acc.values())
    else:
        if budgets is not None:
            raise ValueError("budgets selects from a mapping budget -> acc(b), not from a sequence")
        values = list(acc)
    if not values:
        raise ValueError("anytime accuracy needs at least one acc(b)")
    return sum(float(v) for v in values) / len(values)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def check_config(
    *,
    n_samples: int,
    n_summaries: int,
    thinking_budget: int,
    n_budgets: int | None,
    budgets: Sequence[int] | None = None,
    prior: str = "base",
    variance_reduction: str = "brpo",
    lam: float = DEFAULT_LAM,
    summary_method: str = "brpo",
    summary_max_tokens: int = DEFAULT_SUMMARY_MAX_TOKENS,
    loss_normalizer: float = DEFAULT_LOSS_NORMALIZER,
    row_length: int,
) -> list[int]:
    """Raise ValueError naming the field on the first inconsistency; return the resolved budgets.

    n_samples is G (rollout.n_rollouts); row_length is the most response tokens one packed row may hold
    (rollout.max_response_length): b_m thinking tokens plus m * A summaries with their inserts.
    """
    if n_samples < 2:
        raise ValueError(f"rollout.n_rollouts: BRPO compares a prompt's thinking samples and needs G >= 2, "
                         f"got {n_samples}")
    if n_summaries < 1:
        raise ValueError(f"{FIELD}n_summaries: must be >= 1, got {n_summaries}")
    resolved = training_budgets(thinking_budget, n_budgets, budgets)
    budget_prior(prior, resolved)  # every named prior is non-negative and sums to 1
    _check_choice(variance_reduction, VARIANCE_REDUCTIONS, "variance_reduction")
    _check_lam(lam)
    _check_choice(summary_method, SUMMARY_METHODS, "summary_method")
    # With A > 1 the released code trained only the last draw of slot m, which was never intended.
    if summary_method == "grpo" and n_summaries != 1:
        raise ValueError(f"{FIELD}n_summaries: summary_method=grpo requires n_summaries=1, got {n_summaries}")
    if summary_max_tokens < 1:
        raise ValueError(f"{FIELD}summary_max_tokens: must be >= 1, got {summary_max_tokens}")
    if not loss_normalizer > 0:
        raise ValueError(f"{FIELD}loss_normalizer: must be > 0, got {loss_normalizer}")
    need = resolved[-1] + len(resolved) * n_summaries * (summary_max_tokens + INSERT_ALLOWANCE)
    if row_length < need:
        raise ValueError(f"rollout.max_response_length: {row_length} cannot hold b_m={resolved[-1]} thinking tokens "
                         f"plus {len(resolved)}x{n_summaries} summaries of {summary_max_tokens}+{INSERT_ALLOWANCE} "
                         f"tokens = {need}; raise it or lower {FIELD}n_summaries / {FIELD}summary_max_tokens")
    return resolved


# --------------------------------------------------------------------------------------------------
# The training row: one thinking sample with its m * A summaries (docs/anytime.md, "Integration")
# --------------------------------------------------------------------------------------------------


def packed_row(
    thinking_length: int,
    budgets: Sequence[int],
    thinking_adv: torch.Tensor,
    summary_adv: torch.Tensor,
    cuts: Sequence[int],
    inserted_lengths: Sequence[int],
    summary_lengths: Sequence[int],
) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """Token-level advantages of one packed row: thinking z, then one span per summary (inserted + generated).

    thinking_adv: [m], the sample's row of `thinking_advantage`; summary_adv: [m * A], its summaries'
    advantages, slot-major (slot j's A draws are branches j*A .. j*A+A-1); cuts: [m] c_j; inserted_lengths,
    summary_lengths: [m * A] per branch. Returns (branches: [(context, span)] with `context` the number of
    response tokens the branch sees before its own span (its cut c_j) and `span` its inserted + generated
    tokens; advantages [R] float64 over the R = L + sum(spans) response tokens; trainable [R] bool: thinking
    tokens (each once) and generated summary tokens, not the inserted ones).
    """
    m = len(budgets)
    n_branches = len(inserted_lengths)
    if len(cuts) != m or len(summary_lengths) != n_branches or n_branches % m or summary_adv.shape != (n_branches,):
        raise ValueError(f"need {m} cuts and m*A branches with as many inserted/summary lengths and advantages, got "
                         f"{len(cuts)} cuts, {n_branches}/{len(summary_lengths)} lengths, {tuple(summary_adv.shape)}")
    per_slot = n_branches // m
    parts = [thinking_token_advantage(thinking_length, budgets, thinking_adv).to(torch.float64)]
    masks = [torch.ones(thinking_length, dtype=torch.bool)]
    branches = []
    for k, (inserted, generated) in enumerate(zip(inserted_lengths, summary_lengths)):
        cut = int(cuts[k // per_slot])
        if not 1 <= cut <= thinking_length or inserted < 1 or generated < 1:
            raise ValueError(f"branch {k}: cut {cut} of {thinking_length}, {inserted} inserted and {generated} "
                             "generated tokens; a summary needs a cut inside the thinking and >= 1 of each")
        branches.append((cut, inserted + generated))
        parts += [torch.zeros(inserted, dtype=torch.float64),
                  torch.full((generated,), float(summary_adv[k]), dtype=torch.float64)]
        masks += [torch.zeros(inserted, dtype=torch.bool), torch.ones(generated, dtype=torch.bool)]
    return branches, torch.cat(parts), torch.cat(masks)
