"""The embedded default's current main job: `python -m megatron_hbpo.explain` on the tiny recipe."""

import subprocess
import sys
from conftest import REPO



def run(*args):
    return subprocess.run([sys.executable, "-m", "megatron_hbpo.explain", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_explain_tiny_recipe_end_to_end():
    proc = run("--config", "recipes/tiny_cpu.yaml")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world 1 = TP 1 x PP 1 x CP 1 x DP 1" in out
    assert "'<think> I will answer the question within 16 tokens'" in out
    # R(L = b, b) = f2(b) = 4 cos(pi * 16 / 192) for the smallest budget: 3.864.
    assert "f2(b)      3.864" in out
    # The truncated illustrative response is a format error, scored through the real verifier.
    assert "no_answer" in out and "timeout" not in out


def test_explain_grpo_and_bad_override():
    proc = run("--config", "recipes/tiny_cpu_grpo.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "GRPO baseline" in proc.stdout
    bad = run("--config", "recipes/tiny_cpu.yaml", "rollout.n_rollouts=10")
    assert bad.returncode == 2 and "rollout.n_rollouts" in bad.stderr and bad.stderr.count("\n") == 1
