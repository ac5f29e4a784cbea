"""A training run's summary: accuracy and mean tokens per level before vs after training, per prompt
mode (summary.json), its plot, and the comparison of several runs (`python -m megatron_hbpo.report`).

summary.json:
    {"levels": {level: {"before": {"accuracy", "mean_tokens"}, "after": {...}}},     natural mode
     "budgets": {mode: {level: {"before": ..., "after": ...}}},                       every other mode
     "adherence": {"before": ..., "after": ...},       the results' budget-adherence sections
     "wall_seconds", "recipe", "algo", "steps", ...}
It is derived from the two evaluation results (eval_before.json, eval_after.json, the results schema).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_hbpo.data.chat import NATURAL
from megatron_hbpo.evaluation.metrics import ALL
from megatron_hbpo.evaluation.plots import plot_levels
from megatron_hbpo.evaluation.tables import Pair, cell, markdown_table


def _per_level(result: Mapping[str, Any], mode: str) -> dict[str, dict[str, float]]:
    """{level..., "all": {accuracy, mean_tokens}} of a single-benchmark results document's mode."""
    (metrics,) = result["results"][mode].values()
    out = {lv: m for lv, m in metrics["levels"].items()}
    out[ALL] = metrics["all"]
    return {lv: {"accuracy": m["accuracy"], "mean_tokens": m["tokens"]["mean"]} for lv, m in out.items()}


def build_summary(before: Mapping[str, Any], after: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """summary.json from the before and after results of one benchmark (the training task's eval set)."""
    def both(mode: str) -> dict[str, dict[str, dict[str, float]]]:
        b, a = _per_level(before, mode), _per_level(after, mode)
        return {lv: {"before": b[lv], "after": a[lv]} for lv in a}

    return {"levels": both(NATURAL),
            "budgets": {mode: both(mode) for mode in after["results"] if mode != NATURAL},
            "adherence": {"before": before.get("adherence", {}), "after": after.get("adherence", {})}, **extra}


def _pairs(per_level: Mapping[str, Mapping[str, Any]], when: str) -> dict[str, Pair]:
    return {lv: (v[when]["accuracy"], v[when]["mean_tokens"]) for lv, v in per_level.items()}


def plot_summary(summary: Mapping[str, Any], path: str | Path, *,
                 baselines: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    """Tokens and accuracy per level in natural mode: the base, this run, and each baseline run's "after"."""
    series = {"base (before)": _pairs(summary["levels"], "before"),
              f"{summary.get('recipe', 'run')} (after)": _pairs(summary["levels"], "after")}
    for name, other in (baselines or {}).items():
        if name != summary.get("recipe"):
            series[f"{name} (after)"] = _pairs(other["levels"], "after")
    return plot_levels(series, path, title=" (natural mode)")


def runs_table(summaries: Mapping[str, Mapping[str, Any]], mode: str = NATURAL) -> str:
    """One row for the base (the first run's "before"), one per run ("after"); a column per level."""
    def per_level(summary: Mapping[str, Any]) -> Mapping[str, Any]:
        return summary["levels"] if mode == NATURAL else summary["budgets"].get(mode, {})

    first = per_level(next(iter(summaries.values())))
    levels = list(first)
    rows = [["base", *(cell(_pairs(first, "before")[lv]) for lv in levels)]]
    for name, summary in summaries.items():
        values = _pairs(per_level(summary), "after")
        rows.append([name, *(cell(values.get(lv)) for lv in levels)])
    return markdown_table([mode, *(ALL if lv == ALL else f"level {lv}" for lv in levels)], rows)
