"""Rollout layouts of their own beside Megatron's (tests/dist/rollout_layouts.py does the work):
greedy samples equal a world-of-one run, Megatron's groups keep working once vLLM has joined, the
ranks of a replica sample alike and replicas differently, and after a refit vLLM and Megatron agree."""

from __future__ import annotations

import pytest

from conftest import run_torchrun
from tiny_models import save_tiny_qwen2

pytestmark = pytest.mark.dist

LAYOUTS = {  # name: (torchrun arguments, rollout replicas)
    "tp2-training_two-replicas-t1": (["--tp", "2", "--rollout-tp", "1"], 2),
    "tp2-training_one-replica-t2": (["--tp", "2", "--rollout-tp", "2"], 1),
    "dp2-training_one-replica-t2": (["--rollout-tp", "2"], 1),
    "pp2-training_two-replicas-t1": (["--pp", "2", "--rollout-tp", "1"], 2),
}
# Multi-rank vLLM is slow on 2 cores: the default run keeps the layout that used to deadlock at start
# (training TP 2, an engine on every rank); the others run with `make test-slow`.
# All slow: the default suite trains in two of these layouts (tests/test_trainer.py, TP2 with one
# replica of T=2 and PP2 with two replicas of T=1), which checks rollouts, gathering and refit there.
FAST: set[str] = set()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("layouts") / "model")  # peaked: greedy output is sensitive


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    [report] = run_torchrun("rollout_layouts.py", "--model", str(model), "--work", str(tmp_path_factory.mktemp("ref")),
                            nproc=1, timeout=600).reports
    return report


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in LAYOUTS])
def test_layout(name, model, reference, tmp_path):
    args, replicas = LAYOUTS[name]
    reports = run_torchrun("rollout_layouts.py", "--model", str(model), "--work", str(tmp_path), *args, nproc=2,
                           timeout=900).reports
    assert [r["replicas"] for r in reports] == [replicas] * 2
    for report in reports:
        # Every rank holds every prompt group's greedy samples, equal to the world-of-one run.
        assert report["greedy"] == reference["greedy"], report["rank"]
        # Megatron's tensor-parallel all-reduce after the engines joined: 1 + 2 at TP 2, else the rank's own.
        assert report["allreduce"] == [3.0, 3.0] if "tp2-training" in name else [report["rank"] + 1.0] * 2
        # vLLM and Megatron agree on the same weights, disagree after a training step, agree after the refit.
        assert report["mismatch_same_weights"]["mean_abs"] < 1e-5
        assert report["mismatch_before_refit"]["mean_abs"] > 0.1
        assert report["mismatch_after_refit"]["mean_abs"] < 1e-5
    same = reports[0]["sampled"] == reports[1]["sampled"]
    assert same == (replicas == 1)  # one replica: its ranks agree; two replicas: different draws
