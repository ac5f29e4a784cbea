"""Records -> the results schema every evaluation writes (results.json, the trainer's eval_*.json):

    {"format": RESULT_FORMAT, "label": ..., "settings": {...},
     "results": {mode: {benchmark: {"all": summary, "levels": {level: summary}}}},
     "average": {mode: {"accuracy", "mean_tokens"}},
     "adherence": {family: {"kind", "soft_margin", "targets",
                            "results": {benchmark: {"all": grid summary, "levels": {level: grid summary}}}}},
     ...}

A summary holds samples, problems, accuracy (pass@1 averaged over the samples of each problem),
tokens {mean, median, p90}, mean thinking / answer tokens, truncation, no-`</think>`, NoThinking
(an empty thinking block: AdaptThink's Ratio_NT) and format-error rates, and reflection
keywords per response. Under a mode that asks for a length (budget:N, length:N, max_length:N;
data/chat.py mode_target) it also holds "adherence": the budget-adherence metrics against N
(evaluation/adherence.py). "adherence" at the top averages them over each family's targets
(budget, length, max_length: HBPO's budgets and L1's two sentences), equal weight per target, with
the length-target correlation (docs/baselines.md, "Budget adherence").
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_hbpo.algo.constants import ADHERENCE_SOFT_MARGIN
from megatron_hbpo.data.chat import mode_target
from megatron_hbpo.evaluation.adherence import adherence_metrics, adherence_summary
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


def summarize(records: Sequence[ScoredResponse], soft_margin: float = ADHERENCE_SOFT_MARGIN) -> dict[str, Any]:
    """Metrics of one group of responses (a benchmark, or one of its levels), all under one mode; with
    "adherence" when the mode asks for a length."""
    count = len(records)
    if not count:
        raise ValueError("no responses to summarize")
    tokens = [r.tokens for r in records]
    keywords = list(records[0].reflections)
    per_keyword = {k: sum(r.reflections.get(k, 0) for r in records) / count for k in keywords}
    summary = {
        "samples": count,
        "problems": len({r.problem_index for r in records}),
        "accuracy": sum(r.correct for r in records) / count,
        "tokens": token_stats(tokens),
        "mean_thinking_tokens": sum(r.thinking_tokens for r in records) / count,
        "mean_answer_tokens": sum(r.answer_tokens for r in records) / count,
        "truncation_rate": sum(r.truncated for r in records) / count,
        "no_think_close_rate": sum(not r.closed_thinking for r in records) / count,
        "nothinking_rate": sum(r.nothinking for r in records) / count,
        "format_error_rate": sum(r.status == "no_answer" for r in records) / count,
        "reflections": {"total": sum(per_keyword.values()), "per_keyword": per_keyword},
    }
    target = mode_target(records[0].setting)
    if target is not None:
        summary["adherence"] = adherence_metrics(tokens, target[0], kind=target[1], soft_margin=soft_margin,
                                                 correct=[r.correct for r in records],
                                                 truncated=[r.truncated for r in records])
    return summary


def benchmark_metrics(records: Sequence[ScoredResponse], soft_margin: float = ADHERENCE_SOFT_MARGIN
                      ) -> dict[str, Any]:
    """{"all": summary, "levels": {level: summary}} for one benchmark and mode; levels sorted
    numerically (MATH levels 1-5), empty when no record has a level."""
    by_level: dict[str, list[ScoredResponse]] = defaultdict(list)
    for r in records:
        if r.level is not None:
            by_level[str(r.level)].append(r)
    return {"all": summarize(records, soft_margin),
            "levels": {lv: summarize(by_level[lv], soft_margin) for lv in sorted(by_level, key=level_sort_key)}}


def collect_results(records: Sequence[ScoredResponse], soft_margin: float = ADHERENCE_SOFT_MARGIN
                    ) -> dict[str, dict[str, dict[str, Any]]]:
    """{mode: {benchmark: benchmark_metrics}}, in the order modes and benchmarks first appear."""
    groups: dict[str, dict[str, list[ScoredResponse]]] = {}
    for r in records:
        groups.setdefault(r.setting, {}).setdefault(r.benchmark, []).append(r)
    return {s: {b: benchmark_metrics(rs, soft_margin) for b, rs in per.items()} for s, per in groups.items()}


def mode_family(mode: str) -> str:
    """The family of a length-asking mode: "budget:512" -> "budget", "max_length:512" -> "max_length"."""
    return mode.split(":", 1)[0]


def adherence_results(results: Mapping[str, Mapping[str, Any]], soft_margin: float = ADHERENCE_SOFT_MARGIN
                      ) -> dict[str, Any]:
    """The "adherence" section: per family of length-asking modes (the modes of `results` with a
    target), per benchmark and level, the equal-weight average over the family's targets."""
    families: dict[str, list[str]] = {}
    for mode in results:
        if mode_target(mode) is not None:
            families.setdefault(mode_family(mode), []).append(mode)
    out: dict[str, Any] = {}
    for family, modes in families.items():
        modes = sorted(modes, key=lambda m: mode_target(m) or (0, ""))
        benchmarks = list(dict.fromkeys(b for m in modes for b in results[m]))
        per_benchmark = {}
        for name in benchmarks:
            present = [results[m][name] for m in modes if name in results[m]]
            levels = list(dict.fromkeys(lv for m in present for lv in m["levels"]))
            per_benchmark[name] = {
                "all": adherence_summary({m["all"]["adherence"]["target"]: m["all"]["adherence"] for m in present}),
                "levels": {lv: adherence_summary({m["levels"][lv]["adherence"]["target"]: m["levels"][lv]["adherence"]
                                                  for m in present if lv in m["levels"]}) for lv in levels}}
        out[family] = {"kind": (mode_target(modes[0]) or (0, ""))[1], "soft_margin": soft_margin,
                       "targets": [(mode_target(m) or (0, ""))[0] for m in modes], "results": per_benchmark}
    return out


def average_over_benchmarks(per_benchmark: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The paper's Avg column: the unweighted mean over benchmarks of accuracy and of mean tokens."""
    rows = [m["all"] for m in per_benchmark.values()]
    if not rows:
        return {"accuracy": math.nan, "mean_tokens": math.nan}
    return {"accuracy": sum(r["accuracy"] for r in rows) / len(rows),
            "mean_tokens": sum(r["tokens"]["mean"] for r in rows) / len(rows)}


def results_document(records: Sequence[ScoredResponse], *, label: str,
                     soft_margin: float = ADHERENCE_SOFT_MARGIN, **fields: Any) -> dict[str, Any]:
    """The results schema around `records`: format, label, results, average, adherence, plus `fields`
    (model, settings, benchmarks, timing, versions, ...). soft_margin: tokens over a target that make a
    soft violation (L1's 500 at L_max 4096)."""
    results = collect_results(records, soft_margin)
    return {"format": RESULT_FORMAT, "label": label, **fields, "results": results,
            "average": {s: average_over_benchmarks(per) for s, per in results.items()},
            "adherence": adherence_results(results, soft_margin)}


def is_results_document(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == RESULT_FORMAT and isinstance(obj.get("results"), dict)
