"""L1 / LCPO baselines, L1-Exact and L1-Max (docs/baselines.md, "L1").

A target length N is appended to the user turn and GRPO is trained on a reward that mixes
correctness with length adherence:

    exact mode: R = 1[correct] - alpha * |N - L|
    max mode:   R = 1[correct] * clip(alpha_max * (N - L) + delta, 0, 1)
    no target:  R = 1[correct]

The advantage is GRPO's (`advantage.group_normalized_advantage`); all rollouts of a prompt share
one (N, mode), drawn once per problem and kept for every epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from megatron_hbpo.algo.constants import L1_ALPHA as DEFAULT_ALPHA
from megatron_hbpo.algo.constants import L1_ALPHA_MAX as DEFAULT_ALPHA_MAX
from megatron_hbpo.algo.constants import L1_DELTA as DEFAULT_DELTA
from megatron_hbpo.algo.constants import L1_MAX_FRACTION as DEFAULT_MAX_FRACTION
from megatron_hbpo.algo.constants import L1_N_MAX as DEFAULT_N_MAX
from megatron_hbpo.algo.constants import L1_N_MIN as DEFAULT_N_MIN
from megatron_hbpo.algo.constants import L1_STAGE as DEFAULT_STAGE
from megatron_hbpo.algo.reward import float_dtype, per_sample_tensors

# The authors' settings (docs/baselines.md, "L1") are defined once, in algo/constants.py; the
# recipe's checks of them are config.L1Config's.

EXACT_SENTENCE = " Think for {target} tokens."
MAX_SENTENCE = " Think for maximum {target} tokens."

MODE_NONE, MODE_EXACT, MODE_MAX = "none", "exact", "max"
# Integer codes for tensors; "none" is 0 so that a zero-filled tensor means "no instruction".
MODE_CODES = {MODE_NONE: 0, MODE_EXACT: 1, MODE_MAX: 2}
STAGES = (MODE_EXACT, MODE_MAX)


def length_instruction(target: int, mode: str) -> str:
    """The sentence appended to the user text for target N in `mode` ("" for mode "none")."""
    if mode == MODE_NONE:
        return ""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"an L1 target must be a positive int, got {target!r}")
    if mode == MODE_EXACT:
        return EXACT_SENTENCE.format(target=target)
    if mode == MODE_MAX:
        return MAX_SENTENCE.format(target=target)
    raise ValueError(f"L1 mode must be one of {list(MODE_CODES)}, got {mode!r}")


def append_length_instruction(user_text: str, target: int, mode: str) -> str:
    """The user turn with L1's length sentence at its end (before the chat template is applied).

    The sentence goes after the user's instruction, separated by one space as in L1's training
    data; nothing is added to the assistant turn.
    """
    return user_text + length_instruction(target, mode)


def sample_targets(
    num_problems: int,
    *,
    generator: torch.Generator,
    stage: str = DEFAULT_STAGE,
    n_min: int = DEFAULT_N_MIN,
    n_max: int = DEFAULT_N_MAX,
    max_fraction: float = DEFAULT_MAX_FRACTION,
) -> tuple[list[int], list[str]]:
    """Targets N ~ U{n_min..n_max} (both included) and modes for `num_problems` problems.

    Stage "exact": every mode is "exact". Stage "max" (L1-Max's dual objective): each problem is
    "max" with probability `max_fraction`, else "exact". The mode draw is made in both stages so
    that a generator in the same state gives the same N to a problem in either stage.
    Returns (targets [P] ints, modes [P] strings).
    """
    if stage not in STAGES:
        raise ValueError(f"L1 stage must be one of {list(STAGES)}, got {stage!r}")
    if not 1 <= n_min <= n_max:
        raise ValueError(f"L1 targets need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    targets = torch.randint(n_min, n_max + 1, (num_problems,), generator=generator)
    is_max = torch.rand(num_problems, generator=generator, dtype=torch.float64) < max_fraction
    if stage == MODE_EXACT:
        is_max = torch.zeros_like(is_max)
    return targets.tolist(), [MODE_MAX if m else MODE_EXACT for m in is_max.tolist()]


def problem_generator(seed: int, problem_key: str) -> torch.Generator:
    """A generator seeded by (seed, problem): the same draw for a problem in every epoch, on every
    rank and after a resume, whatever order the data is read in."""
    digest = hashlib.sha256(f"{seed}\0{problem_key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def problem_target(
    seed: int,
    problem_key: str,
    *,
    stage: str = DEFAULT_STAGE,
    n_min: int = DEFAULT_N_MIN,
    n_max: int = DEFAULT_N_MAX,
    max_fraction: float = DEFAULT_MAX_FRACTION,
) -> tuple[int, str]:
    """(N, mode) of one problem, a pure function of (seed, problem_key) and the settings."""
    targets, modes = sample_targets(1, generator=problem_generator(seed, problem_key), stage=stage,
                                    n_min=n_min, n_max=n_max, max_fraction=max_fraction)
    return targets[0], modes[0]


def mode_codes(modes: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """[N] int64 codes (MODE_CODES) for mode names; an integer tensor is checked and passed through."""
    if isinstance(modes, torch.Tensor):
        known = torch.tensor(list(MODE_CODES.values()))
        if modes.is_floating_point() or not torch.isin(modes, known).all():
            raise ValueError(f"L1 mode codes must be in {known.tolist()}, got {modes.unique().tolist()}")
        return modes.to(torch.int64)
    unknown = sorted({m for m in modes if m not in MODE_CODES})
    if unknown:
        raise ValueError(f"L1 modes must be in {list(MODE_CODES)}, got {unknown}")
    return torch.tensor([MODE_CODES[m] for m in modes], dtype=torch.int64)


def l1_reward(
    lengths: torch.Tensor,
    targets: torch.Tensor,
    modes: Sequence[str] | torch.Tensor,
    correct: torch.Tensor,
    format_ok: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    alpha_max: float = DEFAULT_ALPHA_MAX,
    delta: float = DEFAULT_DELTA,
) -> torch.Tensor:
    """One L1 reward per sample, each by the formula of its own mode.

    Args (1-D, one entry per sample):
        lengths: generated response tokens L (eos excluded); a truncated response has L = cap.
        targets: the target N the sample was prompted with (ignored for mode "none").
        modes: mode names or MODE_CODES ints ("exact", "max", "none").
        correct: bool, the final answer matches the ground truth.
        format_ok: bool, `</think>` and an extractable answer (a truncated response has neither).
    Returns: rewards in the widest floating dtype of lengths/targets, else the default dtype.

    A format error counts as a wrong answer and nothing else: exact mode still subtracts its length
    term, so a wrong or malformed exact-mode answer scores -alpha |N - L| (docs/baselines.md, "L1").
    """
    lengths, targets, codes, correct, format_ok = per_sample_tensors(
        "l1_reward", lengths=lengths, targets=targets, modes=mode_codes(modes), correct=correct, format_ok=format_ok)
    dtype = float_dtype(lengths, targets)
    length_f, target_f = lengths.to(dtype), targets.to(dtype)
    solved = (correct.bool() & format_ok.bool()).to(dtype)

    exact = solved - alpha * (target_f - length_f).abs()
    maximum = solved * (alpha_max * (target_f - length_f) + delta).clamp(0.0, 1.0)
    return torch.where(codes == MODE_CODES[MODE_EXACT], exact,
                       torch.where(codes == MODE_CODES[MODE_MAX], maximum, solved))
