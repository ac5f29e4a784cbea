"""The run summary's picture: mean response tokens and accuracy per level, before vs after training."""

from __future__ import annotations

from pathlib import Path


def plot_summary(summary: dict, path: str | Path, *, baselines: dict[str, dict] | None = None) -> None:
    """Two panels (tokens, accuracy) over the levels of natural-mode evaluation; one line for the base,
    one for this run, and one per baseline summary (its "after")."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    levels = [lv for lv in summary["levels"] if lv != "all"]
    series = {"base (before)": {lv: summary["levels"][lv]["before"] for lv in levels},
              f"{summary.get('recipe', 'run')} (after)": {lv: summary["levels"][lv]["after"] for lv in levels}}
    for name, other in (baselines or {}).items():
        if name != summary.get("recipe"):
            series[f"{name} (after)"] = {lv: other["levels"][lv]["after"] for lv in levels if lv in other["levels"]}
    fig, (ax_tokens, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, values in series.items():
        xs = [lv for lv in levels if lv in values]
        ax_tokens.plot(xs, [values[lv]["mean_tokens"] for lv in xs], marker="o", label=name)
        ax_acc.plot(xs, [100 * values[lv]["accuracy"] for lv in xs], marker="o", label=name)
    ax_tokens.set(xlabel="level", ylabel="mean response tokens", title="tokens per level (natural mode)")
    ax_acc.set(xlabel="level", ylabel="accuracy (%)", title="accuracy per level (natural mode)", ylim=(0, 102))
    ax_tokens.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def comparison_table(summaries: dict[str, dict], mode: str = "natural") -> str:
    """Markdown: one row for the base, one per run; cells 'accuracy% / mean tokens' per level.

    mode: "natural" (summary["levels"]) or a budget ("16": summary["budgets"]["16"]).
    """
    def per_level(summary: dict) -> dict:
        return summary["levels"] if mode == "natural" else summary["budgets"].get(mode, {})

    first = next(iter(summaries.values()))
    levels = list(per_level(first))
    cell = "{:.1f}% / {:.1f}"
    lines = [f"| {mode} | " + " | ".join("all" if lv == "all" else f"level {lv}" for lv in levels) + " |",
             "|---" * (len(levels) + 1) + "|"]
    base = per_level(first)
    lines.append("| base | " + " | ".join(cell.format(100 * base[lv]["before"]["accuracy"],
                                                     base[lv]["before"]["mean_tokens"]) for lv in levels) + " |")
    for name, summary in summaries.items():
        values = per_level(summary)
        lines.append(f"| {name} | " + " | ".join(
            cell.format(100 * values[lv]["after"]["accuracy"], values[lv]["after"]["mean_tokens"])
            if lv in values else "-" for lv in levels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Compare runs' summary.json (accuracy %% / mean tokens per level).")
    parser.add_argument("runs", nargs="+", help="run directories (logging.dir) holding summary.json")
    parser.add_argument("--mode", default="natural", help="natural (default) or a budget, e.g. 16")
    args = parser.parse_args(argv)
    summaries = {}
    for run in args.runs:
        file = Path(run) / "summary.json"
        if not file.is_file():
            parser.error(f"{file}: not found (a run writes it when it finishes with eval.before_after: true)")
        summaries[Path(run).name] = json.loads(file.read_text())
    print(comparison_table(summaries, args.mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
