"""Train HBPO and its baselines from one warm-up base on the embedded task and print one comparison table.

    python -m megatron_hbpo.compare [--methods grpo,tlmre,l1_max,adaptthink,hbpo,anytime_grpo,anytime]
                                    [--seeds 1234,1235] [--warmup-per-seed [--jobs 1]] [--short]
                                    [--out runs/compare] [--nproc 1]
                                    [dotted.overrides ...]

The multi-seed demo (`make demo-seeds`): `make run`'s recipe over three seeds, each with its own warm-up,

    python -m megatron_hbpo.compare --methods hbpo --seeds 1234,1235,1236 --warmup-per-seed --out runs/demo_seeds

The anytime methods (AnytimeReasoner and its GRPO baseline) train from a warm-up base of their own (the task's
tokenizer gains the forced-summary markers, and the warm-up teaches answering after a cut), so they are
compared among themselves, by acc(b) curves on a budget grid, in a second table (anytime_comparison.md,
or comparison.md when only they run):

    python -m megatron_hbpo.compare --methods anytime_grpo,anytime [--seeds ...] [--table-only] ...

Each method trains with its tiny recipe (recipes/tiny_cpu[_<method>].yaml, all on the warm-up base of
recipes/tiny_cpu.yaml) once per seed (train.seed), as a `python -m megatron_hbpo.train` subprocess, and
is evaluated before and after training in natural mode and under HBPO's budget prompts budget:N for
N in its budgets (every method: for the baselines this is a control; the warm-up base has seen the
sentence), plus L1-Max under its own max_length:N. L1-Max runs its two stages (docs/baselines.md,
"L1"): L1-Exact for the first 700/820 of the steps, then the max stage resumed from that checkpoint.

The table: per method, accuracy % and mean response tokens per level in natural mode, the NoThinking
share (responses with an empty thinking block), and budget adherence averaged over the targets (within-
budget and soft-violation rates, mean overshoot, mean absolute deviation, r(N, L)); each as the mean
over the seeds with [min, max]. A second table holds every cell of the evaluation (accuracy % and mean
response tokens per prompt mode and level) for the base (before training) and each method (after), each
as the mean over the seeds [min, max]. Without --warmup-per-seed every seed starts from the recipe's one
warm-up base (warmup.prebuilt where it matches, else warmup.seed in warmup.dir), so the spread is the RL's
and the evaluation's alone; with it, seed S also trains its own base (warmup.seed=warmup.init_seed=S, in
<out>/warmup/seed_S, shared by the seed's methods), so the spread covers the warm-up's variance too. `--short`
is a smoke run (a 40-step warm-up of its own, 2 steps, 4 problems per level): its numbers mean nothing. Writes
<out>/comparison.md and comparison.json; each run's directory keeps its logs, metrics.jsonl and eval_*.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megatron_hbpo import atomic
from megatron_hbpo.config import ConfigError, Recipe, load_recipe
from megatron_hbpo.data.chat import NATURAL, budget_mode
from megatron_hbpo.evaluation.metrics import ALL
from megatron_hbpo.evaluation.tables import markdown_table

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"hbpo": "tiny_cpu.yaml", "grpo": "tiny_cpu_grpo.yaml", "tlmre": "tiny_cpu_tlmre.yaml",
           "l1_max": "tiny_cpu_l1_max.yaml", "l1_exact": "tiny_cpu_l1_exact.yaml",
           "adaptthink": "tiny_cpu_adaptthink.yaml", "anytime_grpo": "tiny_cpu_anytime_grpo.yaml",
           "anytime": "tiny_cpu_anytime.yaml"}
ANYTIME_METHODS = ("anytime_grpo", "anytime")  # compared by acc(b) on a budget grid, not by natural mode
DEFAULT_METHODS = ("grpo", "tlmre", "l1_max", "adaptthink", "hbpo", "anytime_grpo", "anytime")
DEFAULT_SEEDS = (1234, 1235)
L1_EXACT_SHARE = 700 / 820  # L1-Exact's 700 steps before L1-Max's 120 (docs/baselines.md, "L1")
SHORT = ["warmup.steps=40", "train.total_steps=2", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
         "eval.problems_per_level=4", "algo.adaptthink.reference_problems_per_level=2", "algo.adaptthink.ref_samples=4"]
ADHERENCE = (("within_budget_rate", "within %"), ("soft_violation_rate", "soft viol. %"),
             ("mean_overshoot", "overshoot %"), ("mean_abs_deviation", "abs. dev. %"))


class CompareError(RuntimeError):
    """A training run failed; the message names it and ends with its log's last lines."""


def train_command(recipe: str, overrides: Sequence[str], nproc: int, resume: str | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "megatron_hbpo.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "megatron_hbpo.train"]
    return [*launcher, "--config", str(REPO / "recipes" / recipe), *(["--resume", resume] if resume else []),
            *overrides]


def run_training(command: list[str], log: Path, echo=print) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), VLLM_LOGGING_LEVEL="WARNING")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise CompareError(f"{' '.join(command)} exited {proc.returncode} (log {log}):\n{tail}")
    echo(f"  done in {time.perf_counter() - start:.0f} s ({log})")


def method_runs(method: str, seed: int, out: Path, common: Sequence[str], nproc: int, total_steps: int,
                warmup_per_seed: bool = False) -> list[tuple[list[str], Path]]:
    """The training commands of one method and seed, in order, with their log files; the last run's
    directory (out/method/seed_S) holds the evaluation. warmup_per_seed: the seed's own warm-up base
    (warmup.seed=S in out/warmup/seed_S)."""
    run_dir = out / method / f"seed_{seed}"
    own = [f"train.seed={seed}", f"logging.dir={run_dir}", f"checkpoint.dir={run_dir / 'ck'}", *common]
    if warmup_per_seed:  # the anytime methods' base is another one (forced-summary examples)
        bases = out / ("warmup_anytime" if method in ANYTIME_METHODS else "warmup")
        own += [f"warmup.seed={seed}", f"warmup.init_seed={seed}", f"warmup.dir={bases / f'seed_{seed}'}",
                "warmup.prebuilt=null"]
    if method != "l1_max":
        return [(train_command(RECIPES[method], own, nproc), run_dir / "train.log")]
    exact_steps = max(1, min(total_steps - 1, round(total_steps * L1_EXACT_SHARE)))
    exact_dir = run_dir / "exact"
    exact = [*own, f"train.total_steps={exact_steps}", f"logging.dir={exact_dir}", f"checkpoint.dir={exact_dir / 'ck'}",
             "eval.before_after=false"]
    resume = str(exact_dir / "ck" / f"step_{exact_steps:07d}")
    return [(train_command(RECIPES["l1_exact"], exact, nproc), exact_dir / "train.log"),
            (train_command(RECIPES["l1_max"], own, nproc, resume=resume), run_dir / "train.log")]


# -- the table -------------------------------------------------------------------------------------------


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """'mean [min, max]' of the finite values (scaled), '-' when there are none."""
    finite = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return "-"
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(finite):.{digits}f}, {max(finite):.{digits}f}]"


def natural_levels(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{level..., "all": summary} of a results document's natural mode (one benchmark)."""
    (metrics,) = result["results"][NATURAL].values()
    return {**metrics["levels"], ALL: metrics["all"]}


def adherence_of(result: Mapping[str, Any], family: str) -> Mapping[str, Any] | None:
    """The grid-averaged adherence ("all" levels) of a results document's mode family, if evaluated."""
    section = result.get("adherence", {}).get(family)
    if not section:
        return None
    (per,) = section["results"].values()
    return per["all"]


def comparison_rows(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison: runs maps a row label to its seeds' results documents (the
    base row: the runs' eval_before; each method: its eval_after)."""
    first = next(iter(runs.values()))[0]
    levels = list(natural_levels(first))
    header = ["method", *(ALL if lv == ALL else f"level {lv}" for lv in levels), "NoThinking %", "length prompt",
              *(name for _, name in ADHERENCE), "r(N, L)"]
    rows = []
    for label, results in runs.items():
        per_level = [natural_levels(r) for r in results]
        cells = [f"{spread([p[lv]['accuracy'] for p in per_level], 100)} / "
                 f"{spread([p[lv]['tokens']['mean'] for p in per_level])}" for lv in levels]
        nothinking = spread([p[ALL].get("nothinking_rate", math.nan) for p in per_level], 100)
        families = list(dict.fromkeys(f for r in results for f in r.get("adherence", {}))) or ["-"]
        for i, family in enumerate(families):
            grids = [adherence_of(r, family) for r in results]
            present = [g for g in grids if g is not None]
            adherence = [spread([g[key] for g in present], 100) for key, _ in ADHERENCE] if present else \
                ["-"] * len(ADHERENCE)
            correlation = spread([g["length_target_correlation"] for g in present], digits=2) if present else "-"
            first_line = [label, *cells, nothinking] if i == 0 else ["", *([""] * len(levels)), ""]
            rows.append([*first_line, f"{family}:N" if family != "-" else "-", *adherence, correlation])
    return header, rows


def comparison_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    header, rows = comparison_rows(runs)
    return markdown_table(header, rows)


def mode_levels(result: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """{(mode, level or "all"): summary} of a results document (one benchmark), modes in its order."""
    cells = {}
    for mode, per_benchmark in result["results"].items():
        (metrics,) = per_benchmark.values()
        cells.update({(mode, level): m for level, m in {**metrics["levels"], ALL: metrics["all"]}.items()})
    return cells


def cells_rows(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of every evaluation cell: one row per (prompt mode, level), and per run label
    (the base, each method) two columns, accuracy % and mean response tokens, each the mean over the
    seeds' results documents [min, max]."""
    per_label = {label: [mode_levels(r) for r in results] for label, results in runs.items()}
    keys = list(next(iter(per_label.values()))[0])
    header = ["mode", "level", *(f"{label} {what}" for label in runs for what in ("acc %", "tokens"))]
    rows = []
    for mode, level in keys:
        row = [mode, level]
        for seeds in per_label.values():
            present = [s[(mode, level)] for s in seeds if (mode, level) in s]
            row += [spread([m["accuracy"] for m in present], 100), spread([m["tokens"]["mean"] for m in present])]
        rows.append(row)
    return header, rows


def cells_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    header, rows = cells_rows(runs)
    return markdown_table(header, rows)


def anytime_metrics_of(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """The acc(b) metrics of an anytime results document (one benchmark)."""
    (metrics,) = result["anytime"].values()
    return metrics


def anytime_comparison_rows(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the anytime comparison: per row label (the base: the runs' eval_before; each
    method: its eval_after) the anytime and final accuracy %, the format rate % over the grid and acc(b) %
    at every budget, each the mean over the seeds' documents [min, max]."""
    budgets = anytime_metrics_of(next(iter(runs.values()))[0])["budgets"]
    header = ["method", "anytime acc", "final acc", "format %", *(f"b={b}" for b in budgets)]
    rows = []
    for label, results in runs.items():
        per_seed = [anytime_metrics_of(r) for r in results]
        if any(m["budgets"] != budgets for m in per_seed):
            raise ValueError(f"{label}: the runs' budget grids differ ({[m['budgets'] for m in per_seed]})")
        fmt = [sum(m["format_rate"].values()) / len(m["format_rate"]) for m in per_seed]
        rows.append([label, spread([m["anytime_accuracy"] for m in per_seed], 100),
                     spread([m["final_accuracy"] for m in per_seed], 100), spread(fmt, 100),
                     *(spread([m["acc"][str(b)] for m in per_seed], 100) for b in budgets)])
    return header, rows


def plot_anytime_seeds(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """acc(b) %: per row label the mean curve over the seeds and its [min, max] band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_hbpo.evaluation.anytime import save_acc_plot

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, results in runs.items():
        per_seed = [anytime_metrics_of(r) for r in results]
        budgets = per_seed[0]["budgets"]
        curves = [[100 * m["acc"][str(b)] for b in budgets] for m in per_seed]
        mean = [sum(c) / len(c) for c in zip(*curves)]
        anytime = 100 * sum(m["anytime_accuracy"] for m in per_seed) / len(per_seed)
        final = 100 * sum(m["final_accuracy"] for m in per_seed) / len(per_seed)
        (line,) = ax.plot(budgets, mean, marker="o", markersize=3,
                          label=f"{label}: anytime {anytime:.1f}, final {final:.1f}")
        ax.fill_between(budgets, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)],
                        color=line.get_color(), alpha=0.2)
    save_acc_plot(fig, ax, f"acc(b), mean over {len(next(iter(runs.values())))} seeds [min, max]", path)


def collect(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> dict[str, list[dict]]:
    """{"base": [eval_before of each seed's first method], method: [eval_after of each seed]}."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text())

    runs: dict[str, list[dict]] = {"base": [read(out / methods[0] / f"seed_{s}" / "eval_before.json") for s in seeds]}
    for method in methods:
        runs[method] = [read(out / method / f"seed_{s}" / "eval_after.json") for s in seeds]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(RECIPES)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="train.seed values (default 1234,1235)")
    parser.add_argument("--warmup-per-seed", action="store_true",
                        help="train each seed's own warm-up base (warmup.seed=S), so the spread covers the warm-up")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --warmup-per-seed: seeds run side by side (timings then mean little)")
    parser.add_argument("--short", action="store_true", help="a smoke run: 40 warm-up steps, 2 steps, a tiny eval")
    parser.add_argument("--out", default=str(REPO / "runs" / "compare"), help="output directory")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (data parallel on CPU)")
    parser.add_argument("--table-only", action="store_true", help="print the table of runs already in --out")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.total_steps=30")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RECIPES]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    plain = [m for m in methods if m not in ANYTIME_METHODS]
    anytime = [m for m in methods if m in ANYTIME_METHODS]
    if unknown or not methods or not seeds or args.nproc < 1 or args.jobs < 1:
        print(f"error: --methods from {', '.join(RECIPES)}, --seeds integers, --nproc and --jobs >= 1 (got "
              f"{args.methods!r}, {args.seeds!r}, {args.nproc}, {args.jobs})", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    common = ["logging.progress_bar=false", "logging.tensorboard=false", f"cluster.gpus_per_node={args.nproc}"]
    if args.short:
        common += [*SHORT, "warmup.prebuilt=null"]
    common += list(args.overrides)
    try:
        recipes = {method: load_recipe(REPO / "recipes" / RECIPES[method], common) for method in methods}
        hbpo = recipes.get("hbpo") or load_recipe(REPO / "recipes" / RECIPES["hbpo"], common)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # HBPO's budget prompts for every plain method: HBPO's own, a control for the others (the anytime
    # methods are evaluated by acc(b) only).
    overrides = {method: common + ([] if method in ANYTIME_METHODS else
                                   ["eval.modes=[" + ",".join(budget_mode(b) for b in hbpo.algo.budgets) + "]"])
                 for method in methods}
    if args.short:  # a short warm-up of their own; the anytime methods' is another (forced-summary examples)
        for method in methods:
            short_base = "warmup_short_anytime" if method in ANYTIME_METHODS else "warmup_short"
            overrides[method].append(f"warmup.dir={out / short_base}")
    if not args.table_only:
        start = time.perf_counter()

        def run_seed(seed: int) -> None:
            for method in methods:
                for command, log in method_runs(method, seed, out, overrides[method], args.nproc,
                                                recipes[method].train.total_steps, args.warmup_per_seed):
                    print(f"{method}, seed {seed}: {' '.join(command[command.index('--config'):][:2])}", flush=True)
                    run_training(command, log)

        try:
            # Seeds side by side only when each has its own warm-up: a shared one would be trained twice.
            with ThreadPoolExecutor(max_workers=args.jobs if args.warmup_per_seed else 1) as pool:
                for done in [pool.submit(run_seed, seed) for seed in seeds]:
                    done.result()
        except CompareError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"all runs done in {time.perf_counter() - start:.0f} s", flush=True)
    if plain:
        plain_report(out, collect(out, plain, seeds), plain, seeds, args, hbpo)
    if anytime:
        first = recipes[anytime[0]]
        anytime_report(out, collect(out, anytime, seeds), anytime, seeds, args, first.train.total_steps,
                       first.eval.problems_per_level, name="anytime_comparison" if plain else "comparison")
    return 0


def plain_report(out: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]], methods: Sequence[str],
                 seeds: Sequence[int], args: argparse.Namespace, hbpo: Recipe) -> None:
    """The natural-mode and adherence table and every evaluation cell, into comparison.md/json and stdout."""
    table = comparison_table(runs)
    cells = cells_table(runs)
    warmups = "each seed's own warm-up base" if args.warmup_per_seed else "one warm-up base for every seed"
    cells_caption = (f"Every evaluation cell: accuracy % / mean response tokens per prompt mode and level, the base "
                     f"before training and each method after it; mean over seeds {', '.join(map(str, seeds))} "
                     f"[min, max], {warmups}.")
    caption = (f"Natural mode: accuracy % / mean response tokens per level; NoThinking: responses with an empty "
               f"thinking block; adherence under each length prompt, averaged over the targets (HBPO's budget:N for "
               f"every method, L1's max_length:N for L1-Max). Mean over seeds {', '.join(map(str, seeds))} "
               f"[min, max]; {hbpo.train.total_steps} steps, {hbpo.eval.problems_per_level} problems per level"
               + (" (--short: a smoke run, the numbers mean nothing)" if args.short else "") + ".")
    atomic.write_text(out / "comparison.md", caption + "\n\n" + table + "\n\n" + cells_caption + "\n\n" + cells + "\n")
    atomic.write_json(out / "comparison.json", {"methods": methods, "seeds": seeds, "short": args.short,
                                                 "overrides": list(args.overrides), "table": table,
                                                 "header_rows": comparison_rows(runs),
                                                 "warmup_per_seed": args.warmup_per_seed, "cells": cells,
                                                 "cells_header_rows": cells_rows(runs)})
    print(caption + "\n\n" + table + "\n\n" + cells_caption + "\n\n" + cells)


def anytime_report(out: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]], methods: Sequence[str],
                   seeds: Sequence[int], args: argparse.Namespace, steps: int, problems_per_level: int,
                   name: str = "comparison") -> None:
    """The acc(b) table of the anytime methods (their own warm-up base) into <name>.md/json/png and stdout."""
    header, rows = anytime_comparison_rows(runs)
    table = markdown_table(header, rows)
    caption = (f"acc(b) %: one thinking sample per problem cut after b tokens and one forced summary; anytime acc: "
               f"the mean over the grid, final acc: acc(b_max), format %: the summaries' format rate over the grid. "
               f"Mean over seeds {', '.join(map(str, seeds))} [min, max]; {steps} steps, {problems_per_level} problems "
               f"per level; base: the anytime methods' own warm-up (forced-summary examples)"
               + (" (--short: a smoke run, the numbers mean nothing)" if args.short else "") + ".")
    atomic.write_text(out / f"{name}.md", caption + "\n\n" + table + "\n")
    atomic.write_json(out / f"{name}.json", {"methods": list(methods), "seeds": list(seeds), "short": args.short,
                                              "overrides": list(args.overrides), "table": table,
                                              "header_rows": [header, rows]})
    plot_anytime_seeds(runs, out / f"{name}.png")
    print("\n" + caption + "\n\n" + table + f"\nwrote {out / f'{name}.png'}")


if __name__ == "__main__":
    sys.exit(main())
