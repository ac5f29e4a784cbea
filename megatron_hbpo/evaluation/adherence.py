"""Budget adherence: how well response lengths follow the budget or target N they were asked for.

L1's length-following measures, so that HBPO under its budget prefixes and L1 under its own length
sentences are reported the same way (docs/baselines.md, "Budget adherence"). For one target N and
its samples' lengths L_i (generated tokens, prompt and prefix excluded):

    mean_error          (mean_i L_i - N) / N                         signed
    mean_abs_deviation  mean_i |L_i - N| / N
    relative_rmse       sqrt(mean_i (L_i - N)^2) / N
    within_budget_rate  mean_i 1[L_i <= N]        hard_violation_rate = 1 - within_budget_rate
    soft_violation_rate mean_i 1[L_i - N > margin]   ("max" budgets: only overshoot violates)
                        mean_i 1[|L_i - N| > margin] ("exact" targets)
    mean_overshoot      mean of (L_i - N) / N over the violators L_i > N (NaN when there are none)

Over a grid of targets every metric is averaged with equal weight per target, and the Pearson
correlation between N and the mean length is added. Plain Python: no torch needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from megatron_hbpo.algo.constants import ADHERENCE_SOFT_MARGIN as DEFAULT_SOFT_MARGIN

# HBPO's training budgets together with L1's evaluation targets; 3600 lies above HBPO's largest budget.
TARGET_GRID = (512, 1024, 2048, 2560, 3600)
KINDS = ("max", "exact")

NAN = float("nan")


def adherence_metrics(
    lengths: Sequence[float],
    target: float,
    *,
    kind: str = "max",
    soft_margin: float = DEFAULT_SOFT_MARGIN,
    correct: Sequence[bool] | None = None,
    truncated: Sequence[bool] | None = None,
) -> dict[str, float]:
    """The adherence metrics of the samples asked for one target N.

    lengths: [n] response lengths; kind: "max" (a budget to stay under: HBPO, L1-Max) or "exact"
    (a length to hit: L1-Exact), which only changes the soft-violation rule. correct / truncated:
    [n] per-sample flags for accuracy and truncation rate (NaN when not given).
    """
    if kind not in KINDS:
        raise ValueError(f"adherence kind must be one of {list(KINDS)}, got {kind!r}")
    if not target > 0:
        raise ValueError(f"the target length must be > 0, got {target}")
    n = len(lengths)
    if n == 0:
        raise ValueError(f"no samples for target {target}")
    for name, flags in (("correct", correct), ("truncated", truncated)):
        if flags is not None and len(flags) != n:
            raise ValueError(f"{len(flags)} {name} flags for {n} lengths")

    errors = [float(length) - target for length in lengths]
    overshoots = [e for e in errors if e > 0]
    soft = [e > soft_margin if kind == "max" else abs(e) > soft_margin for e in errors]
    within = sum(e <= 0 for e in errors) / n
    return {
        "samples": float(n),
        "target": float(target),
        "mean_length": sum(float(x) for x in lengths) / n,
        "mean_error": sum(errors) / n / target,
        "mean_abs_deviation": sum(abs(e) for e in errors) / n / target,
        "relative_rmse": math.sqrt(sum(e * e for e in errors) / n) / target,
        "within_budget_rate": within,
        "hard_violation_rate": 1.0 - within,
        "soft_violation_rate": sum(soft) / n,
        "mean_overshoot": sum(overshoots) / len(overshoots) / target if overshoots else NAN,
        "accuracy": NAN if correct is None else sum(bool(c) for c in correct) / n,
        "truncation_rate": NAN if truncated is None else sum(bool(t) for t in truncated) / n,
    }


def adherence_by_target(
    lengths: Sequence[float],
    targets: Sequence[float],
    *,
    kind: str = "max",
    soft_margin: float = DEFAULT_SOFT_MARGIN,
    correct: Sequence[bool] | None = None,
    truncated: Sequence[bool] | None = None,
) -> dict[float, dict[str, float]]:
    """`adherence_metrics` per target, ascending: samples are grouped by the target each was asked for.

    lengths, targets (and correct / truncated when given): [n] one entry per sample.
    """
    if len(targets) != len(lengths):
        raise ValueError(f"{len(targets)} targets for {len(lengths)} lengths")
    groups: dict[float, list[int]] = {}
    for i, target in enumerate(targets):
        groups.setdefault(target, []).append(i)

    def pick(values: Sequence | None, idx: list[int]) -> list | None:
        return None if values is None else [values[i] for i in idx]

    return {target: adherence_metrics([lengths[i] for i in idx], target, kind=kind, soft_margin=soft_margin,
                                      correct=pick(correct, idx), truncated=pick(truncated, idx))
            for target, idx in sorted(groups.items())}


def adherence_summary(per_target: Mapping[float, Mapping[str, float]]) -> dict[str, float]:
    """Equal-weight average of each metric over the target grid, plus the grid's size, its total
    samples and the Pearson correlation between N and the mean length (NaN for fewer than two
    targets or a constant column).

    A metric undefined at some targets (mean_overshoot without violators, accuracy without flags) is
    averaged over the targets where it is defined, and is NaN where it is defined nowhere.
    """
    if not per_target:
        raise ValueError("adherence_summary needs at least one target")
    rows = list(per_target.values())
    summary: dict[str, float] = {"targets": float(len(rows)), "samples": sum(r["samples"] for r in rows)}
    for name in rows[0]:
        if name in ("samples", "target"):
            continue
        defined = [r[name] for r in rows if not math.isnan(r[name])]
        summary[name] = sum(defined) / len(defined) if defined else NAN
    summary["length_target_correlation"] = pearson_correlation([r["target"] for r in rows],
                                                               [r["mean_length"] for r in rows])
    return summary


def pearson_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson r of two equally long columns; NaN when it is undefined (under two points, no spread)."""
    if len(xs) != len(ys):
        raise ValueError(f"columns of {len(xs)} and {len(ys)} values")
    try:
        return statistics.correlation([float(x) for x in xs], [float(y) for y in ys])
    except statistics.StatisticsError:
        return NAN
