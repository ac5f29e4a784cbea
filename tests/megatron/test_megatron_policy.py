"""The Megatron policy on CPU (gloo): transformers parity and TP/PP/DP equivalence of the HBPO step and
of AdaptThink's sequence-mean step.

The scripts in tests/dist/ do the work under torchrun; see their docstrings for what they compare.
"""

import pytest

from conftest import run_torchrun

pytestmark = pytest.mark.dist


def test_logprobs_match_transformers_float64():
    [report] = run_torchrun("megatron_vs_hf.py", nproc=1).reports
    assert report["failures"] == []  # mapping complete, tied head shared, Megatron -> HF -> Megatron exact
    assert len(report["logp"]) == 4  # qwen2 and llama at temperatures 1.0 and 0.7
    for name, errors in report["logp"].items():
        assert errors["logp_err"] <= 2e-6 and errors["entropy_err"] <= 2e-6, name
    assert report["qwen2 probability_sum_err"] <= 1e-5 and report["llama probability_sum_err"] <= 1e-5
    # Negative control: without Llama-3 rope scaling the logits differ by far more than the tolerance.
    assert report["unscaled_rope_delta"] >= 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("equivalence") / "reference.pt"
    result = run_torchrun("policy_equivalence.py", "--mode", "ref", "--out", str(path), nproc=1)
    return path, result.reports[0]


TOL = 2e-6  # fp32, different reduction orders
TOL_STEP = 1e-6  # weights after one Adam step (the test recipe's Adam eps keeps this about the gradients)


def test_reference_gradient_does_not_depend_on_the_micro_batch_split(reference):
    path, report = reference
    for family in ("qwen2", "llama"):
        assert report[family]["single_micro_batches"] == 1
        assert report[family]["split_grad_diff"] <= TOL
        assert report[family]["clipped"] > 0  # the reference exercises the clipped branch


@pytest.mark.parametrize("mode", ["tp", "pp", "dp", "dp_distopt"])
def test_parallel_step_equals_single_process(reference, mode):
    path, _ = reference
    result = run_torchrun("policy_equivalence.py", "--mode", mode, "--ref", str(path), nproc=2)
    assert len(result.reports) == 2
    for rank, report in enumerate(result.reports):
        for family in ("qwen2", "llama"):
            got = report[family]
            assert got["logp_diff"] <= TOL and got["loss_diff"] <= TOL, (rank, family, got)
            assert got["clipped"] == got["expected_clipped"], (rank, family, got)
            assert got.get("grad_diff", 0.0) <= TOL and got["step_diff"] <= TOL_STEP, (rank, family, got)
            if mode != "dp_distopt":
                assert "grad_diff" in got
            if mode == "dp":
                # Rank 1 had the NaN; both stopped before the optimizer step, each saying where.
                where = "micro-batch holding sequences" if rank == 1 else "another rank"
                assert got["nonfinite"]["message"] and where in got["nonfinite"]["message"], got["nonfinite"]
                assert got["nonfinite"]["changed"] == []


@pytest.fixture(scope="module")
def sequence_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("sequence_equivalence") / "reference.pt"
    result = run_torchrun("policy_equivalence.py", "--mode", "ref", "--out", str(path), "--loss", "sequence", nproc=1)
    return path, result.reports[0]


def test_sequence_loss_gradient_does_not_depend_on_the_micro_batch_split(sequence_reference):
    _, report = sequence_reference
    for family in ("qwen2", "llama"):
        assert report[family]["single_micro_batches"] == 1 and report[family]["split_grad_diff"] <= TOL
        assert report[family]["clipped"] > 0  # the forced token's log 0.5 moves some ratios out of the clip range


@pytest.mark.parametrize("mode", ["dp", pytest.param("tp", marks=pytest.mark.slow)])
def test_sequence_loss_parallel_step_equals_single_process(sequence_reference, mode):
    path, _ = sequence_reference
    result = run_torchrun("policy_equivalence.py", "--mode", mode, "--ref", str(path), "--loss", "sequence", nproc=2)
    for rank, report in enumerate(result.reports):
        for family in ("qwen2", "llama"):
            got = report[family]
            assert got["loss_diff"] <= TOL and got["clipped"] == got["expected_clipped"], (rank, family, got)
            assert got["grad_diff"] <= TOL and got["step_diff"] <= TOL_STEP, (rank, family, got)


# -- AnytimeReasoner's packed tree rows and constant-normaliser loss (docs/anytime.md, "Loss") ------------


@pytest.fixture(scope="module")
def anytime_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("anytime_equivalence") / "reference.pt"
    result = run_torchrun("policy_equivalence.py", "--mode", "ref", "--out", str(path), "--loss", "anytime", nproc=1)
    return path, result.reports[0]


def test_packed_rows_score_each_summary_in_its_sampled_context(anytime_reference):
    """Megatron's log-probs of the packed rows (tree mask, rope at the branch positions) against transformers
    scoring each summary as one plain sequence prompt + thinking[:cut] + inserted + summary (float64)."""
    _, report = anytime_reference
    for family in ("qwen2", "llama"):
        got = report[f"{family} transformers"]
        assert got["summary_tokens"] > 20
        assert got["thinking_err"] <= 1e-5 and got["summary_err"] <= 1e-5, (family, got)


def test_anytime_loss_does_not_depend_on_the_micro_batch_split(anytime_reference):
    _, report = anytime_reference
    for family in ("qwen2", "llama"):
        assert report[family]["single_micro_batches"] == 1 and report[family]["split_grad_diff"] <= TOL
        assert report[family]["clipped"] > 0
        assert report[family]["normalizer"] == 7 * 50  # N_rows * C, not the token count


@pytest.mark.parametrize("mode", ["dp", pytest.param("tp", marks=pytest.mark.slow)])
def test_anytime_loss_parallel_step_equals_single_process(anytime_reference, mode):
    """The same rows at DP2 (uneven shares of rows) and TP2: loss, gradients and the step as at DP1/TP1."""
    path, _ = anytime_reference
    result = run_torchrun("policy_equivalence.py", "--mode", mode, "--ref", str(path), "--loss", "anytime", nproc=2)
    for rank, report in enumerate(result.reports):
        for family in ("qwen2", "llama"):
            got = report[family]
            assert got["logp_diff"] <= TOL and got["loss_diff"] <= TOL, (rank, family, got)
            assert got["clipped"] == got["expected_clipped"] and got["normalizer"] == 7 * 50, (rank, family, got)
            assert got["grad_diff"] <= TOL and got["step_diff"] <= TOL_STEP, (rank, family, got)
