"""Mean response tokens and accuracy per difficulty level: the one plot of the project."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_hbpo import atomic
from megatron_hbpo.evaluation.metrics import ALL
from megatron_hbpo.evaluation.tables import Pair, benchmark_title, model_label, pair


def plot_levels(series: Mapping[str, Mapping[str, Pair]], path: str | Path, *, title: str = "") -> bool:
    """PNG with two panels (tokens, accuracy) over the levels, one line per series {label: {level: pair}}.
    The "all" entry is left out. Returns False (and writes nothing) when no series has a level."""
    series = {name: {lv: v for lv, v in values.items() if lv != ALL} for name, values in series.items()}
    series = {name: values for name, values in series.items() if values}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    fig, (ax_tokens, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, values in series.items():
        levels = list(values)
        ax_tokens.plot(levels, [values[lv][1] for lv in levels], marker="o", label=name)
        ax_acc.plot(levels, [100 * values[lv][0] for lv in levels], marker="o", label=name)
    ax_tokens.set(xlabel="difficulty level", ylabel="mean response tokens", title=f"tokens per level{title}")
    ax_acc.set(xlabel="difficulty level", ylabel="accuracy (%)", title=f"accuracy per level{title}", ylim=(0, 102))
    ax_tokens.legend()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


def result_series(result: Mapping[str, Any], *, label: str | None = None) -> dict[str, dict[str, Pair]]:
    """{"<model> <benchmark> <mode>": {level: pair}} for every benchmark and mode with levels."""
    name = label or model_label(result)
    out: dict[str, dict[str, Pair]] = {}
    for mode, per_benchmark in result["results"].items():
        for benchmark, metrics in per_benchmark.items():
            levels = {lv: pair(m) for lv, m in (metrics.get("levels") or {}).items()}
            if levels:
                out[f"{name} {benchmark_title(benchmark)} {mode}"] = levels  # type: ignore[assignment]
    return out
