"""Records -> the results schema every evaluation writes (results.json, the trainer's eval_*.json):

    {"format": RESULT_FORMAT, "label": ..., "settings": {...},
     "results": {mode: {benchmark: {"all": summary, "levels": {level: summary}}}},
     "average": {mode: {"accuracy", "mean_tokens"}}, ...}

A summary holds samples, problems, accuracy (pass@1 averaged over the samples of each problem),
tokens {mean, median, p90}, mean thinking / answer tokens, truncation, no-`</think>` and
format-error rates, and reflection keywords per response.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_hbpo.evaluation.records import ScoredResponse

RESULT_FORMAT = 2
ALL = "all"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics (numpy's
    default): position q * (n - 1) in the sorted values. NaN for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def token_stats(values: Sequence[float]) -> dict[str, float]:
    """{mean, median, p90} of a list of token counts (NaN for an empty list)."""
    return {"mean": sum(values) / len(values) if values else math.nan,
            "median": percentile(values, 0.5), "p90": percentile(values, 0.9)}


def level_sort_key(level: Any) -> tuple:
    """Numeric levels (and budgets) in numeric order, then named ones, then "all"."""
    text = str(level)
    numeric = text.lstrip("-").isdigit()
    return (text == ALL, not numeric, int(text) if numeric else 0, text)


def summarize(records: Sequence[ScoredResponse]) -> dict[str, Any]:
    """Metrics of one group of responses (a benchmark, or one of its levels)."""
    count = len(records)
    if not count:
        raise ValueError("no responses to summarize")
    tokens = [r.tokens for r in records]
    keywords = list(records[0].reflections)
    per_keyword = {k: sum(r.reflections.get(k, 0) for r in records) / count for k in keywords}
    return {
        "samples": count,
        "problems": len({r.problem_index for r in records}),
        "accuracy": sum(r.correct for r in records) / count,
        "tokens": token_stats(tokens),
        "mean_thinking_tokens": sum(r.thinking_tokens for r in records) / count,
        "mean_answer_tokens": sum(r.answer_tokens for r in records) / count,
        "truncation_rate": sum(r.truncated for r in records) / count,
        "no_think_close_rate": sum(not r.closed_thinking for r in records) / count,
        "format_error_rate": sum(r.status == "no_answer" for r in records) / count,
        "reflections": {"total": sum(per_keyword.values()), "per_keyword": per_keyword},
    }


def benchmark_metrics(records: Sequence[ScoredResponse]) -> dict[str, Any]:
    """{"all": summary, "levels": {level: summary}} for one benchmark and mode; levels sorted
    numerically (MATH levels 1-5), empty when no record has a level."""
    by_level: dict[str, list[ScoredResponse]] = defaultdict(list)
    for r in records:
        if r.level is not None:
            by_level[str(r.level)].append(r)
    return {"all": summarize(records),
            "levels": {lv: summarize(by_level[lv]) for lv in sorted(by_level, key=level_sort_key)}}


def collect_results(records: Sequence[ScoredResponse]) -> dict[str, dict[str, dict[str, Any]]]:
    """{mode: {benchmark: benchmark_metrics}}, in the order modes and benchmarks first appear."""
    groups: dict[str, dict[str, list[ScoredResponse]]] = {}
    for r in records:
        groups.setdefault(r.setting, {}).setdefault(r.benchmark, []).append(r)
    return {s: {b: benchmark_metrics(rs) for b, rs in per.items()} for s, per in groups.items()}


def average_over_benchmarks(per_benchmark: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The paper's Avg column: the unweighted mean over benchmarks of accuracy and of mean tokens."""
    rows = [m["all"] for m in per_benchmark.values()]
    if not rows:
        return {"accuracy": math.nan, "mean_tokens": math.nan}
    return {"accuracy": sum(r["accuracy"] for r in rows) / len(rows),
            "mean_tokens": sum(r["tokens"]["mean"] for r in rows) / len(rows)}


def results_document(records: Sequence[ScoredResponse], *, label: str, **fields: Any) -> dict[str, Any]:
    """The results schema around `records`: format, label, results, average, plus `fields` (model,
    settings, benchmarks, timing, versions, ...)."""
    results = collect_results(records)
    return {"format": RESULT_FORMAT, "label": label, **fields, "results": results,
            "average": {s: average_over_benchmarks(per) for s, per in results.items()}}


def is_results_document(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == RESULT_FORMAT and isinstance(obj.get("results"), dict)
