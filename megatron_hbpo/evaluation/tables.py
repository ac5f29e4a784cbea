"""Markdown tables of results: one renderer (`markdown_table`), one cell format (`cell`).

Views: `results_table` (the paper's shape: a row per model and mode, a column per benchmark plus
Avg), `level_table` (a row per mode, a column per difficulty level), `details_table` (token
distribution, thinking/answer split, rates), `adherence_table` (budget adherence per target and
level, and its average over the targets), `compare_table` (two results and their deltas) and
`format_report` (the results.md file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_hbpo.evaluation.metrics import ALL, average_over_benchmarks

# Display names of the paper's benchmarks; any other name is shown as given.
BENCHMARK_TITLES = {"gsm8k": "GSM8K", "math500": "MATH500", "olympiadbench": "Olympiad", "olympiad": "Olympiad",
                    "aime24": "AIME24", "aime25": "AIME25", "amc": "AMC", "amc23": "AMC23"}
Pair = tuple[float, float]  # (accuracy in [0, 1], mean response tokens)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cell(value: Pair | None) -> str:
    """'82.3/1111' or '82.3/12.4': accuracy in %, one decimal / mean response tokens (one decimal below 100)."""
    if value is None or math.isnan(value[0]) or math.isnan(value[1]):
        return "-"
    accuracy, tokens = value
    return f"{100 * accuracy:.1f}/{tokens:.1f}" if abs(tokens) < 100 else f"{100 * accuracy:.1f}/{tokens:.0f}"


def delta_cell(a: Pair | None, b: Pair | None) -> str:
    """'+2.2/-441 (-39.7%)': accuracy points / tokens, and the relative token change, B - A."""
    if a is None or b is None:
        return "-"
    relative = f" ({100 * (b[1] - a[1]) / a[1]:+.1f}%)" if a[1] else ""
    tokens = f"{b[1] - a[1]:+.1f}" if abs(b[1] - a[1]) < 100 else f"{b[1] - a[1]:+.0f}"
    return f"{100 * (b[0] - a[0]):+.1f}/{tokens}{relative}"


def pair(summary: Mapping[str, Any] | None) -> Pair | None:
    return None if summary is None else (summary["accuracy"], summary["tokens"]["mean"])


def benchmark_title(name: str) -> str:
    return BENCHMARK_TITLES.get(name.lower(), name)


def model_label(result: Mapping[str, Any]) -> str:
    return result.get("label") or Path(str(result.get("model", "model"))).name or "model"


def _benchmarks_of(*results: Mapping[str, Any]) -> list[str]:
    names: dict[str, None] = {}
    for result in results:
        for per_benchmark in result["results"].values():
            names.update(dict.fromkeys(per_benchmark))
    return list(names)


def _row_values(per_benchmark: Mapping[str, Any], benchmarks: Sequence[str]) -> list[Pair | None]:
    values = [pair(per_benchmark[name]["all"]) if name in per_benchmark else None for name in benchmarks]
    average = average_over_benchmarks({b: per_benchmark[b] for b in benchmarks if b in per_benchmark})
    return values + [(average["accuracy"], average["mean_tokens"])]


def results_table(result: Mapping[str, Any]) -> str:
    """A row per mode, cells 'accuracy% / mean tokens' per benchmark and the Avg over the row's benchmarks."""
    benchmarks = _benchmarks_of(result)
    rows = [[model_label(result), mode, *(cell(v) for v in _row_values(per, benchmarks))]
            for mode, per in result["results"].items()]
    return markdown_table(["model", "mode", *(benchmark_title(b) for b in benchmarks), "Avg"], rows)


def level_table(result: Mapping[str, Any]) -> str:
    """For each benchmark with levels: a row per mode, a column per level and 'all'; '' if none has levels."""
    blocks = []
    for name in _benchmarks_of(result):
        per_mode = {mode: per[name] for mode, per in result["results"].items() if per.get(name, {}).get("levels")}
        if not per_mode:
            continue
        levels = list(dict.fromkeys(lv for m in per_mode.values() for lv in m["levels"]))
        rows = [[mode, *(cell(pair(m["levels"].get(lv))) for lv in levels), cell(pair(m["all"]))]
                for mode, m in per_mode.items()]
        blocks.append(markdown_table([f"{benchmark_title(name)}: mode", *(f"level {lv}" for lv in levels), ALL], rows))
    return "\n\n".join(blocks)


def details_table(result: Mapping[str, Any]) -> str:
    """Token distribution, thinking/answer split, truncation, format errors and reflections."""
    rows = []
    for mode, per_benchmark in result["results"].items():
        for name, metrics in per_benchmark.items():
            m, t = metrics["all"], metrics["all"]["tokens"]
            rows.append([mode, benchmark_title(name), str(m["samples"]), f"{100 * m['accuracy']:.1f}",
                         f"{t['mean']:.0f}", f"{t['median']:.0f}", f"{t['p90']:.0f}",
                         f"{m['mean_thinking_tokens']:.0f}",
                         f"{m['mean_answer_tokens']:.0f}", f"{100 * m['truncation_rate']:.1f}",
                         f"{100 * m['no_think_close_rate']:.1f}", percent(m.get("nothinking_rate", math.nan)),
                         f"{100 * m['format_error_rate']:.1f}", f"{m['reflections']['total']:.2f}"])
    return markdown_table(["mode", "benchmark", "samples", "acc %", "mean", "median", "p90", "thinking", "answer",
                           "truncated %", "no </think> %", "NoThinking %", "no answer %", "reflections/resp"], rows)


ADHERENCE_COLUMNS = ("within_budget_rate", "soft_violation_rate", "mean_overshoot", "mean_error",
                     "mean_abs_deviation", "relative_rmse", "accuracy", "truncation_rate")
ADHERENCE_HEADER = ("within %", "soft viol. %", "overshoot %", "mean err. %", "abs. dev. %", "rel. RMSE %",
                    "acc %", "truncated %")


def percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def adherence_row(metrics: Mapping[str, float]) -> list[str]:
    """The adherence metrics as table cells, in ADHERENCE_COLUMNS order (percent, one decimal)."""
    return [percent(metrics[name]) for name in ADHERENCE_COLUMNS]


def adherence_table(result: Mapping[str, Any]) -> str:
    """Budget adherence (docs/baselines.md): for each family of length prompts (budget, length,
    max_length) and benchmark, a row per target and level, then the average over the targets per level
    with the length-target correlation r. '' when no mode asked for a length."""
    blocks = []
    for family, section in result.get("adherence", {}).items():
        rule = "L - N > " if section["kind"] == "max" else "|L - N| > "
        title = (f"{family}:N ({section['kind']} targets; soft violation: {rule}{section['soft_margin']} tokens; "
                 f"overshoot: mean (L - N)/N over L > N)")
        for name, per in section["results"].items():
            rows = []
            for target in section["targets"]:
                mode = f"{family}:{target}"
                metrics = result["results"].get(mode, {}).get(name)
                if metrics is None:
                    continue
                for level, summary in [*metrics["levels"].items(), (ALL, metrics["all"])]:
                    a = summary["adherence"]
                    rows.append([str(target), str(level), str(int(a["samples"])), f"{a['mean_length']:.1f}",
                                 *adherence_row(a), ""])
            for level, summary in [*per["levels"].items(), (ALL, per["all"])]:
                rows.append(["mean", str(level), str(int(summary["samples"])), f"{summary['mean_length']:.1f}",
                             *adherence_row(summary), f"{summary['length_target_correlation']:.2f}"])
            blocks.append(f"{benchmark_title(name)}, {title}\n\n" + markdown_table(
                ["N", "level", "samples", "mean L", *ADHERENCE_HEADER, "r(N, L)"], rows))
    return "\n\n".join(blocks)


def format_report(result: Mapping[str, Any]) -> str:
    """The Markdown file of a run: the results table, the per-level table, the details."""
    s = result.get("settings", {})
    parts = [f"# Evaluation of {result.get('model', model_label(result))}",
             f"n={s.get('n')}, temperature={s.get('temperature')}, top_p={s.get('top_p')}, "
             f"max_tokens={s.get('max_tokens')}; cells: accuracy % (pass@1) / mean response tokens",
             results_table(result)]
    levels = level_table(result)
    if levels:
        parts += ["## Per difficulty level", levels]
    adherence = adherence_table(result)
    if adherence:
        parts += ["## Budget adherence", adherence]
    parts += ["## Details", details_table(result)]
    return "\n\n".join(parts) + "\n"


def compare_table(a: Mapping[str, Any], b: Mapping[str, Any], *, label_a: str | None = None,
                  label_b: str | None = None) -> str:
    """Side by side: for each mode the two results share, a row per result and a delta row (B - A).
    Avg is compared over the benchmarks both have; per-level blocks follow for benchmarks with levels in both."""
    label_a, label_b = label_a or model_label(a), label_b or model_label(b)
    if label_a == label_b:
        label_a, label_b = f"A: {label_a}", f"B: {label_b}"
    benchmarks = _benchmarks_of(a, b)
    shared = [s for s in a["results"] if s in b["results"]]
    if not shared:
        raise ValueError(f"the two results share no mode (A: {list(a['results'])}, B: {list(b['results'])})")
    rows, blocks = [], []
    for mode in shared:
        ra, rb = a["results"][mode], b["results"][mode]
        common = [x for x in benchmarks if x in ra and x in rb]
        va, vb = _row_values(ra, benchmarks), _row_values(rb, benchmarks)
        va[-1] = _row_values({x: ra[x] for x in common}, common)[-1]
        vb[-1] = _row_values({x: rb[x] for x in common}, common)[-1]
        rows += [[mode, label_a, *(cell(v) for v in va)], [mode, label_b, *(cell(v) for v in vb)],
                 [mode, "delta", *(delta_cell(x, y) for x, y in zip(va, vb))]]
        for name in common:
            la, lb = ra[name].get("levels") or {}, rb[name].get("levels") or {}
            levels = [lv for lv in la if lv in lb]
            if levels:
                blocks.append(markdown_table(
                    [f"{benchmark_title(name)} ({mode})", *(f"level {lv}" for lv in levels)],
                    [[label_a, *(cell(pair(la[lv])) for lv in levels)],
                     [label_b, *(cell(pair(lb[lv])) for lv in levels)],
                     ["delta", *(delta_cell(pair(la[lv]), pair(lb[lv])) for lv in levels)]]))
    header = ["mode", "model", *(benchmark_title(x) for x in benchmarks), "Avg"]
    return "\n\n".join([markdown_table(header, rows), *blocks]) + "\n"
