"""The Megatron policy on CPU (gloo): transformers parity and TP/PP/DP equivalence of the HBPO step.

The scripts in tests/dist/ do the work under torchrun; see their docstrings for what they compare.
"""

import pytest

from conftest import run_torchrun

pytestmark = pytest.mark.dist


def test_logprobs_match_transformers_float64():
    proc = run_torchrun("megatron_vs_hf.py", nproc=1)
    assert proc.stdout.count("max |logp - transformers fp64|") == 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("equivalence") / "reference.pt"
    run_torchrun("policy_equivalence.py", "--mode", "ref", "--out", str(path), nproc=1)
    return path


@pytest.mark.parametrize("mode", ["tp", "pp", "dp", "dp_distopt"])
def test_parallel_step_equals_single_process(reference, mode):
    proc = run_torchrun("policy_equivalence.py", "--mode", mode, "--ref", str(reference), nproc=2)
    for family in ("qwen2", "llama"):
        assert proc.stdout.count(f"{mode} {family}: max |diff|") == 2
    if mode == "dp":
        assert "another rank" in proc.stdout and "micro-batch holding sequences" in proc.stdout
