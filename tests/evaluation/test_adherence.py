"""Budget-adherence metrics on hand-computed examples (docs/baselines.md, "Budget adherence")."""

import math

import pytest

from megatron_hbpo.evaluation.adherence import (
    adherence_by_target,
    adherence_metrics,
    adherence_summary,
    pearson_correlation,
)


def test_one_target_by_hand():
    # N = 500, L = 400, 500, 600, 1200: errors -100, 0, 100, 700.
    got = adherence_metrics([400, 500, 600, 1200], 500, correct=[1, 0, 1, 1], truncated=[0, 0, 0, 1])
    assert got == pytest.approx({
        "samples": 4.0, "target": 500.0, "mean_length": 675.0,
        "mean_error": 175 / 500,                           # 0.35
        "mean_abs_deviation": 900 / 4 / 500,               # 0.45
        "relative_rmse": math.sqrt(510000 / 4) / 500,      # 0.714...
        "within_budget_rate": 0.5,                         # 400 and 500 (L = N is within)
        "hard_violation_rate": 0.5,
        "soft_violation_rate": 0.25,                       # only 1200 is more than 500 over
        "mean_overshoot": (100 + 700) / 2 / 500,           # 0.8, over the two violators
        "accuracy": 0.75, "truncation_rate": 0.25,
    }, abs=1e-12)
    assert list(got) == ["samples", "target", "mean_length", "mean_error", "mean_abs_deviation", "relative_rmse",
                         "within_budget_rate", "hard_violation_rate", "soft_violation_rate", "mean_overshoot",
                         "accuracy", "truncation_rate"]


def test_soft_violations_are_one_sided_for_budgets_and_two_sided_for_exact_targets():
    lengths = [400, 1000, 1600, 1500]  # errors -600, 0, 600, 500 (exactly the margin: not a violation)
    assert adherence_metrics(lengths, 1000, kind="max")["soft_violation_rate"] == 0.25
    assert adherence_metrics(lengths, 1000, kind="exact")["soft_violation_rate"] == 0.5
    assert adherence_metrics(lengths, 1000, kind="exact", soft_margin=100)["soft_violation_rate"] == 0.75


def test_no_violators_and_no_flags_give_nan():
    got = adherence_metrics([100, 200], 512)
    assert got["within_budget_rate"] == 1.0 and got["hard_violation_rate"] == 0.0
    assert math.isnan(got["mean_overshoot"]) and math.isnan(got["accuracy"]) and math.isnan(got["truncation_rate"])
    assert got["mean_error"] == pytest.approx((150 - 512) / 512, abs=1e-12)


def test_grouping_by_target_and_equal_weight_summary():
    lengths = [500, 300, 1500, 900, 1100, 2000]
    targets = [1024, 512, 2048, 1024, 1024, 2048]
    per = adherence_by_target(lengths, targets, correct=[1, 1, 0, 1, 0, 1])
    assert list(per) == [512, 1024, 2048]
    assert per[512]["samples"] == 1 and per[1024]["samples"] == 3 and per[2048]["samples"] == 2
    assert per[1024]["mean_length"] == pytest.approx(2500 / 3)
    assert per[1024]["within_budget_rate"] == pytest.approx(2 / 3)
    assert per[1024]["mean_overshoot"] == pytest.approx(76 / 1024)
    assert per[2048]["accuracy"] == 0.5

    summary = adherence_summary(per)
    assert summary["targets"] == 3 and summary["samples"] == 6
    # Each target weighs the same, whatever its sample count.
    assert summary["within_budget_rate"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert summary["accuracy"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert summary["mean_overshoot"] == pytest.approx(76 / 1024)  # defined at 1024 only
    assert math.isnan(summary["truncation_rate"])
    # Pearson r of N = (512, 1024, 2048) against mean L = (300, 833.3, 1750), by hand.
    xs, ys = [512, 1024, 2048], [300, 2500 / 3, 1750]
    mx, my = sum(xs) / 3, sum(ys) / 3
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(
        sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert summary["length_target_correlation"] == pytest.approx(r, abs=1e-12)
    assert 0.99 < r < 1


def test_correlation_undefined_cases():
    assert math.isnan(adherence_summary(adherence_by_target([100, 200], [512, 512]))["length_target_correlation"])
    assert math.isnan(pearson_correlation([512, 1024], [300, 300]))
    assert pearson_correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kind"):
        adherence_metrics([1], 10, kind="min")
    with pytest.raises(ValueError, match="no samples"):
        adherence_metrics([], 10)
    with pytest.raises(ValueError, match="> 0"):
        adherence_metrics([1], 0)
    with pytest.raises(ValueError, match="targets"):
        adherence_by_target([1, 2], [10])
    with pytest.raises(ValueError, match="correct"):
        adherence_metrics([1, 2], 10, correct=[True])
    with pytest.raises(ValueError, match="at least one"):
        adherence_summary({})
