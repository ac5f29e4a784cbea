"""The Megatron policy on CPU (gloo): transformers parity and TP/PP/DP equivalence of the HBPO step, of
AdaptThink's sequence-mean step and of AnytimeReasoner's packed-row step.

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
    """The world-1 reference of every loss, in one process."""
    path = tmp_path_factory.mktemp("equivalence") / "reference.pt"
    result = run_torchrun("policy_equivalence.py", "--mode", "ref", "--out", str(path), "--loss", ",".join(LOSSES),
                          nproc=1)
    return path, result.reports[0]


LOSSES = ("clipped", "sequence", "anytime")  # HBPO's token mean, AdaptThink's sequence mean, AnytimeReasoner's rows
# Each two-rank layout runs once for the losses it checks: TP and DP every loss, PP and the distributed
# optimizer HBPO's (the data path they change is the same for every loss).
MODE_LOSSES = {"tp": LOSSES, "dp": LOSSES, "pp": ("clipped",), "dp_distopt": ("clipped",)}
TOL = 2e-6  # fp32, different reduction orders
TOL_STEP = 1e-6  # weights after one Adam step (the test recipe's Adam eps keeps this about the gradients)


@pytest.fixture(scope="module")
def parallel_reports(reference):
    """mode -> the two ranks' reports of that layout against the reference, each run once."""
    path, _ = reference
    runs: dict = {}

    def run(mode: str) -> list[dict]:
        if mode not in runs:
            result = run_torchrun("policy_equivalence.py", "--mode", mode, "--ref", str(path),
                                  "--loss", ",".join(MODE_LOSSES[mode]), nproc=2)
            assert len(result.reports) == 2
            runs[mode] = result.reports
        return runs[mode]

    return run


def test_reference_gradient_does_not_depend_on_the_micro_batch_split(reference):
    _, report = reference
    for loss in LOSSES:
        for family in ("qwen2", "llama"):
            got = report[loss][family]
            assert got["single_micro_batches"] == 1 and got["split_grad_diff"] <= TOL, (loss, family, got)
            # Every reference exercises the clipped branch (for AdaptThink's loss, the forced token's
            # log 0.5 moves some sequence ratios out of the clip range).
            assert got["clipped"] > 0, (loss, family)
    for family in ("qwen2", "llama"):
        assert report["anytime"][family]["normalizer"] == 7 * 50  # N_rows * C, not the token count


@pytest.mark.parametrize("mode", ["tp", "pp", "dp", "dp_distopt"])
def test_parallel_step_equals_single_process(parallel_reports, mode):
    for rank, report in enumerate(parallel_reports(mode)):
        for loss in MODE_LOSSES[mode]:
            for family in ("qwen2", "llama"):
                got = report[loss][family]
                where = (rank, loss, family, got)
                assert got["logp_diff"] <= TOL and got["loss_diff"] <= TOL, where
                assert got["clipped"] == got["expected_clipped"], where
                assert got.get("grad_diff", 0.0) <= TOL and got["step_diff"] <= TOL_STEP, where
                if mode != "dp_distopt":
                    assert "grad_diff" in got
                if loss == "anytime":
                    assert got["normalizer"] == 7 * 50, where  # uneven shares of rows, the same constant
                elif mode == "dp":
                    # Rank 1 had the NaN; both stopped before the optimizer step, each saying where.
                    where_nan = "micro-batch holding sequences" if rank == 1 else "another rank"
                    assert got["nonfinite"]["message"] and where_nan in got["nonfinite"]["message"], got["nonfinite"]
                    assert got["nonfinite"]["changed"] == []


# -- AnytimeReasoner's packed tree rows (docs/anytime.md, "Loss") ---------------------------------------------


def test_packed_rows_score_each_summary_in_its_sampled_context(reference):
    """Megatron's log-probs of the packed rows (tree mask, rope at the branch positions) against transformers
    scoring each summary as one plain sequence prompt + thinking[:cut] + inserted + summary (float64)."""
    _, report = reference
    for family in ("qwen2", "llama"):
        got = report["anytime"][f"{family} transformers"]
        assert got["summary_tokens"] > 20
        assert got["thinking_err"] <= 1e-5 and got["summary_err"] <= 1e-5, (family, got)
