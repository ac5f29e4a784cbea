"""The comparison of HBPO and its baselines on the embedded task (`python -m megatron_hbpo.compare`), and
each baseline's tiny recipe end to end as users run it (subprocesses with vLLM, like tests/test_trainer.py).

The default suite runs AdaptThink's tiny recipe end to end (2 steps from a 40-step warm-up, with
evaluation) and the table's arithmetic. Slow: the short comparison (2 steps per method) for L1-Max and
AdaptThink and for every method over two seeds, each baseline on two data-parallel ranks, and the
long comparison reported in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO
from test_trainer import PYTHON_ENV, assert_finite_metrics, finish, launch, read_metrics

from megatron_hbpo.compare import anytime_comparison_rows, cells_table, comparison_table, plot_anytime_seeds
from megatron_hbpo.compare import main as compare_main
from megatron_hbpo.evaluation.anytime import AnytimeSample, anytime_metrics
from megatron_hbpo.evaluation.metrics import results_document
from megatron_hbpo.evaluation.records import ScoredResponse

METHODS = ("grpo", "tlmre", "l1_max", "adaptthink", "hbpo")


def record(setting: str, level: str, tokens: int, correct: bool, nothinking: bool = False) -> ScoredResponse:
    return ScoredResponse(benchmark="synthetic", setting=setting, problem_index=0, level=level, correct=correct,
                          tokens=tokens, thinking_tokens=tokens, answer_tokens=0, closed_thinking=True,
                          truncated=False, status="ok", answer="1", gold="1", nothinking=nothinking)


def document(accuracy: float, tokens: int, budget_tokens: int) -> dict:
    """A results document: 2 levels x 4 samples in natural mode, and budget:16 / budget:32."""
    records = [record("natural", lv, tokens, i < 4 * accuracy, nothinking=i == 0) for lv in ("1", "2")
               for i in range(4)]
    records += [record(f"budget:{b}", lv, budget_tokens * b // 16, True) for b in (16, 32) for lv in ("1", "2")
                for _ in range(2)]
    return results_document(records, label="x", soft_margin=4)


def test_comparison_table_means_and_ranges_over_seeds():
    table = comparison_table({"base": [document(0.5, 40, 20), document(0.5, 40, 20)],
                              "hbpo": [document(0.75, 20, 15), document(1.0, 30, 17)]})
    lines = table.splitlines()
    assert lines[0] == ("| method | level 1 | level 2 | all | NoThinking % | length prompt | within % | soft viol. % "
                        "| overshoot % | abs. dev. % | r(N, L) |")
    base, hbpo = lines[2].split(" | "), lines[3].split(" | ")
    assert base[1] == "50.0 [50.0, 50.0] / 40.0 [40.0, 40.0]" and base[4] == "25.0 [25.0, 25.0]"
    assert hbpo[1] == "87.5 [75.0, 100.0] / 25.0 [20.0, 30.0]"
    # budget:16 with 15 tokens and budget:32 with 30: all within, overshoot undefined (no violator); with 17
    # and 34 tokens, all over by 1/16 and 2/32: the mean overshoot is over the seed where it is defined.
    assert base[5] == "budget:N" and hbpo[6] == "50.0 [0.0, 100.0]" and hbpo[8] == "6.2"
    # 20 and 40 tokens: 4 and 8 over; with a soft margin of 4 only the second is a soft violation.
    assert base[6] == "0.0 [0.0, 0.0]" and base[7] == "50.0 [50.0, 50.0]"


def test_cells_table_holds_every_mode_and_level_with_ranges():
    table = cells_table({"base": [document(0.5, 40, 20), document(0.75, 44, 20)],
                         "hbpo": [document(1.0, 20, 15), document(0.5, 30, 17)]})
    lines = table.splitlines()
    assert lines[0] == "| mode | level | base acc % | base tokens | hbpo acc % | hbpo tokens |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert [row[:2] for row in rows] == [[mode, level] for mode in ("natural", "budget:16", "budget:32")
                                         for level in ("1", "2", "all")]
    assert rows[0][2:] == ["62.5 [50.0, 75.0]", "42.0 [40.0, 44.0]", "75.0 [50.0, 100.0]", "25.0 [20.0, 30.0]"]
    # budget:32 holds 2 x 15 x 32 / 16 = 30 tokens per response in the first document, 34 in the second.
    assert rows[-1][4:] == ["100.0 [100.0, 100.0]", "32.0 [30.0, 34.0]"]


def anytime_document(rewards: list[list[float]]) -> dict:
    """An eval_*.json of the anytime method: one thinking sample per row of rewards (budgets 8 and 16); a
    reward of 0.5 stands for a summary out of format."""
    samples = [AnytimeSample(problem=i, level="1", length=16, ending="think_end", rewards=[float(r == 1) for r in row],
                             format_ok=[r != 0.5 for r in row], cuts=[8, 16]) for i, row in enumerate(rewards)]
    return {"anytime": {"synthetic": anytime_metrics(samples, [8, 16])}}


def test_anytime_comparison_means_and_ranges_over_seeds(tmp_path):
    base = anytime_document([[0, 1], [0.5, 0]])
    runs = {"base": [base, base],
            "anytime_grpo": [anytime_document([[0, 1], [0, 1]]), anytime_document([[0.5, 1], [1, 1]])],
            "anytime": [anytime_document([[1, 1], [0, 1]]), anytime_document([[1, 1], [1, 1]])]}
    header, rows = anytime_comparison_rows(runs)
    assert header == ["method", "anytime acc", "final acc", "format %", "b=8", "b=16"]
    assert rows[0] == ["base", "25.0 [25.0, 25.0]", "50.0 [50.0, 50.0]", "75.0 [75.0, 75.0]", "0.0 [0.0, 0.0]",
                       "50.0 [50.0, 50.0]"]
    # seed 1: acc(8) 0, acc(16) 1 -> anytime 50; seed 2: acc(8) 0.5 (one out of format), acc(16) 1 -> 75
    assert rows[1] == ["anytime_grpo", "62.5 [50.0, 75.0]", "100.0 [100.0, 100.0]", "87.5 [75.0, 100.0]",
                       "25.0 [0.0, 50.0]", "100.0 [100.0, 100.0]"]
    assert rows[2][1:3] == ["87.5 [75.0, 100.0]", "100.0 [100.0, 100.0]"]
    plot_anytime_seeds(runs, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 0
    runs["anytime"][1]["anytime"]["synthetic"]["budgets"] = [8, 24]
    with pytest.raises(ValueError, match="grids differ"):
        anytime_comparison_rows(runs)


def test_anytime_comparison_table_only_from_runs(tmp_path, capsys):
    """`--methods anytime_grpo,anytime --table-only` reads out/<method>/seed_S/eval_*.json of finished runs."""
    for method, seed in [(m, s) for m in ("anytime_grpo", "anytime") for s in (1, 2)]:
        run = tmp_path / method / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "eval_before.json").write_text(json.dumps(anytime_document([[0, 1]])))
        (run / "eval_after.json").write_text(json.dumps(anytime_document([[int(method == "anytime"), 1]])))
    assert compare_main(["--out", str(tmp_path), "--methods", "anytime_grpo,anytime", "--seeds", "1,2",
                         "--table-only"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | anytime acc | final acc | format % | b=8 | b=16 |")
    assert [r.split(" | ")[0].lstrip("| ") for r in rows[1:]] == ["base", "anytime_grpo", "anytime"]
    assert rows[3].split(" | ")[1] == "100.0 [100.0, 100.0]" and (tmp_path / "comparison.png").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["methods"] == ["anytime_grpo", "anytime"]
    assert compare_main(["--methods", "grpo,anytme", "--table-only", "--out", str(tmp_path)]) == 2
    assert "error: --methods from" in capsys.readouterr().err

    # With the other methods (one command, as by default): their table in comparison.md, the anytime
    # methods' (their own base) in anytime_comparison.md.
    for method, seed in [(m, s) for m in ("grpo", "hbpo") for s in (1, 2)]:
        run = tmp_path / method / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "eval_before.json").write_text(json.dumps(document(0.5, 40, 20)))
        (run / "eval_after.json").write_text(json.dumps(document(0.75, 20, 15)))
    assert compare_main(["--out", str(tmp_path), "--methods", "grpo,hbpo,anytime_grpo,anytime", "--seeds", "1,2",
                         "--table-only"]) == 0
    out = capsys.readouterr().out
    plain, anytime = out.index("| method | level 1 |"), out.index("| method | anytime acc |")
    assert plain < anytime
    assert json.loads((tmp_path / "comparison.json").read_text())["methods"] == ["grpo", "hbpo"]
    assert json.loads((tmp_path / "anytime_comparison.json").read_text())["methods"] == ["anytime_grpo", "anytime"]
    assert (tmp_path / "anytime_comparison.png").is_file()


def run_compare(out, *args: str, timeout: float) -> str:
    proc = subprocess.run([sys.executable, "-m", "megatron_hbpo.compare", "--out", str(out), *args], cwd=REPO,
                          env=PYTHON_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def check_comparison(out, stdout: str, seeds: list[int], methods=METHODS) -> None:
    for method in methods:
        for seed in seeds:
            run = out / method / f"seed_{seed}"
            metrics = read_metrics(run)
            assert metrics and all(m["train/grad_norm"] > 0 for m in metrics
                                   if (m["advantage/min"], m["advantage/max"]) != (0, 0)), method
            assert_finite_metrics(metrics)
            after = json.loads((run / "eval_after.json").read_text())
            assert {f"budget:{b}" for b in (16, 32, 48, 64)} <= set(after["results"]), method
            assert "budget" in after["adherence"]
    if "l1_max" in methods:
        l1 = json.loads((out / "l1_max" / f"seed_{seeds[0]}" / "eval_after.json").read_text())
        assert set(l1["adherence"]) == {"budget", "max_length"} and l1["adherence"]["max_length"]["kind"] == "max"
        # L1-Max resumed from its L1-Exact stage (1 of the 2 steps).
        log = (out / "l1_max" / f"seed_{seeds[0]}" / "train.log").read_text()
        assert "resumed from" in log and "step_0000001" in log
    if "adaptthink" in methods:  # R_ref per level, measured before the first step
        reference = json.loads((out / "adaptthink" / f"seed_{seeds[0]}" / "adaptthink_reference.json").read_text())
        assert set(reference["table"]) == {"level:1", "level:2", "level:3", "level:4"}
    first = stdout[stdout.index("| method | level 1 |"):]
    rows = [line for line in first[:first.index("\n\n")].splitlines() if line.startswith("| ")]  # the main table
    assert rows[0].startswith("| method | level 1 |") and (out / "comparison.md").is_file()
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]  # rows[0]: the header
    assert [x for x in labels if x] == ["base", *methods]


DEMO_SHORT = ["warmup.steps=10", "warmup.sequences_per_step=16", "train.total_steps=1", "eval.problems_per_level=2",
              "verifier.num_workers=1"]


def test_multi_seed_demo_on_a_short_schedule(tmp_path):
    """The multi-seed demo (README, `make demo-seeds`) on a short schedule: each seed trains its own warm-up
    base and its HBPO run (the two seeds side by side, --jobs 2), and every evaluation cell is printed as mean
    [min, max] over the seeds."""
    seeds = [1234, 1235]
    stdout = run_compare(tmp_path, "--short", "--methods", "hbpo", "--seeds", ",".join(map(str, seeds)),
                         "--warmup-per-seed", "--jobs", "2", *DEMO_SHORT, timeout=600)
    fingerprints = []
    for seed in seeds:
        assert_finite_metrics(read_metrics(tmp_path / "hbpo" / f"seed_{seed}"))
        record = json.loads((tmp_path / "warmup" / f"seed_{seed}" / "warmup.json").read_text())
        assert record["steps"] == 10 and math.isfinite(record["final_loss"])
        fingerprints.append(record["fingerprint"])
    assert fingerprints[0] != fingerprints[1]  # warmup.seed = the seed: two bases
    cells = stdout[stdout.index("Every evaluation cell"):]
    rows = [line.strip("| ").split(" | ") for line in cells.splitlines() if line.startswith("| ")]
    assert rows[0] == ["mode", "level", "base acc %", "base tokens", "hbpo acc %", "hbpo tokens"]
    assert {row[0] for row in rows[1:]} == {"natural", "budget:16", "budget:32", "budget:48", "budget:64"}
    assert len(rows[1:]) == 5 * 5  # 5 modes x (4 levels + all)
    for row in rows[1:]:
        for value in row[2:]:
            mean, low, high = (float(x) for x in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", value).groups())
            assert low <= mean <= high


@pytest.mark.slow
def test_short_comparison_of_the_baselines_with_new_machinery(tmp_path):
    """L1-Max (two stages, its own length prompts) and AdaptThink (forced tokens, R_ref) end to end on one
    rank, and the table (about 2 minutes on an idle 2-core machine, 8 under load)."""
    methods = ("l1_max", "adaptthink")
    stdout = run_compare(tmp_path, "--short", "--seeds", "1234", "--methods", ",".join(methods), timeout=1200)
    check_comparison(tmp_path, stdout, [1234], methods)


@pytest.mark.slow
def test_short_comparison_of_every_method_over_two_seeds(tmp_path):
    stdout = run_compare(tmp_path, "--short", "--seeds", "1234,1235", timeout=3600)
    check_comparison(tmp_path, stdout, [1234, 1235])
    assert (tmp_path / "anytime_comparison.md").is_file()  # AnytimeReasoner and its GRPO, from their own base


@pytest.mark.slow
def test_long_comparison_over_two_seeds(tmp_path):
    """The comparison of BENCHMARKS.md (60 steps, 200 problems per level and mode, two seeds): about two
    hours on the 2-core machine."""
    stdout = run_compare(tmp_path, "--seeds", "1234,1235", timeout=6 * 3600)
    check_comparison(tmp_path, stdout, [1234, 1235])
    print(stdout)


def small_run(recipe: str, root, warmup, *extra: str) -> list[str]:
    return ["--config", str(REPO / "recipes" / recipe), "warmup.steps=40", f"warmup.dir={warmup}",
            "train.total_steps=2", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
            f"checkpoint.dir={root / 'ck'}", f"logging.dir={root / 'run'}", "logging.progress_bar=false",
            "eval.before_after=false", "verifier.num_workers=1", "algo.adaptthink.reference_problems_per_level=2",
            "algo.adaptthink.ref_samples=4", *extra]


@pytest.mark.slow  # the default suite runs every method in-process (tests/test_baselines_loop.py)
def test_adaptthink_tiny_recipe_end_to_end(tmp_path):
    """The default suite's end-to-end run of a baseline: AdaptThink, whose path differs most from HBPO's
    (R_ref through the harness, forced tokens through vLLM, the sequence-mean loss), with evaluation."""
    out = finish(launch(small_run("tiny_cpu_adaptthink.yaml", tmp_path, tmp_path / "warmup", "eval.before_after=true",
                                  "eval.problems_per_level=2", "eval.modes=[budget:32]")))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["rollout/samples"] == 32
    assert_finite_metrics(metrics)
    assert all(m["train/grad_norm"] > 0 and 0 < m["train/ratio"] < 2 for m in metrics)  # A = acc - R_ref + delta != 0
    assert metrics[0]["mismatch/mean_abs"] < 1e-3  # the forced token's log 0.5 is not compared with the trainer's
    reference = json.loads((tmp_path / "run" / "adaptthink_reference.json").read_text())
    assert set(reference["table"]) == {"level:1", "level:2", "level:3", "level:4"} and "R_ref: 4 entries" in out
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert set(after["results"]) == {"natural", "budget:32"} and "nothinking_rate" in after["results"]["natural"][
        "synthetic"]["all"]
    assert after["adherence"]["budget"]["targets"] == [32]


TWO_RANKS = {
    "adaptthink": ("tiny_cpu_adaptthink.yaml", []),
    # one rollout replica over both (TP) ranks: its second rank generates the R_ref samples unscored
    "adaptthink-tp2-one-replica": ("tiny_cpu_adaptthink.yaml", ["parallel.tensor_model_parallel_size=2",
                                                                 "rollout.tensor_parallel_size=2"]),
    "tlmre": ("tiny_cpu_tlmre.yaml", ["algo.tlmre.batch_whiten=true"]),
    "l1-exact": ("tiny_cpu_l1_exact.yaml", []),
    "l1-max": ("tiny_cpu_l1_max.yaml", []),
}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", TWO_RANKS)
def test_baseline_on_two_ranks(tmp_path, name):
    """Two ranks, every one with an engine: each rollout replica generates its block of the prompts and
    every rank scores all records (TLMRE's batch whitening over the whole batch); AdaptThink's R_ref
    pass splits the problems over the replicas and gathers the table."""
    recipe, extra = TWO_RANKS[name]
    out = finish(launch(small_run(recipe, tmp_path, tmp_path / "warmup", "cluster.gpus_per_node=2", *extra), nproc=2))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["rollout/samples"] == 32
    assert_finite_metrics(metrics)
    # The policy moved wherever some advantage was not zero (TLMRE gives none when no answer is correct).
    assert all(m["train/grad_norm"] > 0 for m in metrics if (m["advantage/min"], m["advantage/max"]) != (0, 0))
    assert all(math.isfinite(m["train/loss"]) for m in metrics)
    assert "Traceback" not in out
