"""The synthetic task, its tokenizer, the prompt stream, the warm-up data and the eval tables."""

from __future__ import annotations

import random

import pytest

from megatron_hbpo.algo.budgets import build_prompt
from megatron_hbpo.algo.verify import extract_final_answer
from megatron_hbpo.config import load_recipe
from megatron_hbpo.data.prompts import DataError
from megatron_hbpo.data.source import PromptSource, synthetic_eval_set
from megatron_hbpo.data.synthetic import STEP_TOKENS, STYLES, VERBOSE_TOKENS, Problem, make_problem, response_text, style_mix_sample, \
    task_tokenizer
from megatron_hbpo.evaluate import EvalRecord, aggregate, format_table

RECIPE = "recipes/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return task_tokenizer()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_problem_answer_is_the_last_digit_of_the_sum():
    assert Problem((3, 5, 2, 7, 1), 4).answer == "8"
    assert Problem((9, 9), 1).text == "last digit of a9+b9" and Problem((9, 9), 1).answer == "8"
    rng = random.Random(0)
    for level in (1, 2, 3, 4):
        p = make_problem(rng, level)
        assert len(p.operands) == level + 1 and p.answer == str(sum(p.operands) % 10)
    with pytest.raises(ValueError, match="level"):
        make_problem(rng, 0)


def test_response_styles_have_the_designed_lengths_and_answers(tokenizer):
    rng = random.Random(1)
    for level in (1, 2, 3, 4):
        p = make_problem(rng, level)
        concise, steps, checked, verbose = (response_text(p, s) for s in STYLES)
        assert n_tokens(tokenizer, concise) == 4
        assert n_tokens(tokenizer, steps) == STEP_TOKENS * level + 4  # grows with the level
        assert n_tokens(tokenizer, checked) == (STEP_TOKENS + 1) * level + 4
        assert VERBOSE_TOKENS + 4 <= n_tokens(tokenizer, verbose) <= VERBOSE_TOKENS + 4 + STEP_TOKENS + 1  # flat
        for text in (concise, steps, checked, verbose):
            assert extract_final_answer(text) == p.answer
        # Every line of the chain adds the operand it names to the running total, mod 10, and
        # the verbose chain ends on the last addition (the answer follows the line computing it).
        total = p.operands[0]
        for line, tag, operand in zip(steps.split("</think>")[0].split(";")[:-1], "bcdefghij", p.operands[1:]):
            assert line == f"{total}+{tag}{operand}={(total + operand) % 10}"
            total = (total + operand) % 10
        assert verbose.split("</think>")[0].split(";")[-2].endswith(f"={p.answer}")
    with pytest.raises(ValueError, match="style"):
        response_text(Problem((1, 2), 1), "rambling")


def test_sloppy_additions_are_caught_only_by_the_checked_styles():
    problem = Problem((3, 4, 1, 6, 7), 4)
    wrong_steps = 0
    for seed in range(400):
        steps = response_text(problem, "steps", rng=random.Random(seed), error_rate=0.3)
        wrong_steps += extract_final_answer(steps) != problem.answer
        for style in ("checked", "verbose"):
            text = response_text(problem, style, rng=random.Random(seed), error_rate=0.3)
            assert extract_final_answer(text) == problem.answer
            # Each wrong first result is followed by " no" and the corrected line.
            for part in text.split(" no")[1:]:
                line = part.split(";")[0]
                left, result = line.split("=")
                total, operand = left.split("+")
                assert (int(total) + int(operand[1:])) % 10 == int(result)
    # Unchecked: right only when all four additions were (0.7^4 = 24%).
    assert 0.65 < wrong_steps / 400 < 0.85
    with pytest.raises(ValueError, match="rng"):
        response_text(problem, "steps", error_rate=0.1)


def test_tokenizer_round_trips_and_keeps_one_token_per_symbol(tokenizer):
    prompt = build_prompt(tokenizer, "last digit of a2+b9+c1", 48)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<|user|>", "last"] and tokens.count("<think>") == 1
    assert tokens[4:7] == [" a", "2", "+"]
    assert tokens[-4:] == [" within", " 4", "8", " tokens"]
    assert tokenizer.unk_token_id not in ids
    # eos is special: dropped when a response is decoded for the verifier.
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True).endswith(" tokens")


def test_style_mix_sampling_follows_the_shares():
    rng = random.Random(0)
    draws = [style_mix_sample(rng, {"verbose": 0.8, "concise": 0.2}) for _ in range(4000)]
    assert abs(draws.count("concise") / 4000 - 0.2) < 0.03 and "steps" not in draws
    with pytest.raises(ValueError, match="unknown response styles"):
        style_mix_sample(rng, {"terse": 1.0})


def test_prompt_stream_is_a_function_of_the_step(tmp_path):
    recipe = load_recipe(RECIPE)
    source = PromptSource(recipe)
    assert source.batch(3, 16) == PromptSource(recipe).batch(3, 16)
    assert source.batch(3, 16) != source.batch(4, 16)
    assert {p.level for p in source.batch(0, 200)} == {"1", "2", "3", "4"}
    # Files: epochs are fresh permutations, every row once per epoch.
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"problem": "p{i}", "answer": "{i}"}}\n' for i in range(10)))
    files = load_recipe(RECIPE, ["data.source=files", f"data.train_files=[{data}]", "warmup.steps=0",
                                 "model.tokenizer_path=unused",
                                 "eval.before_after=false"])
    stream = PromptSource(files)
    epoch0 = stream.batch(0, 5) + stream.batch(1, 5)
    epoch1 = stream.batch(2, 5) + stream.batch(3, 5)
    assert sorted(p.answer for p in epoch0) == sorted(str(i) for i in range(10)) == sorted(p.answer for p in epoch1)
    assert epoch0 != epoch1


def test_bad_rows_fail_or_are_skipped_and_counted(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "", "answer": "3"}\n')
    base = ["data.source=files", f"data.train_files=[{data}]", "warmup.steps=0", "model.tokenizer_path=unused",
            "eval.before_after=false"]
    with pytest.raises(DataError, match=rf"{data}:2: missing or empty 'problem'"):
        PromptSource(load_recipe(RECIPE, base))
    source = PromptSource(load_recipe(RECIPE, base + ["data.skip_bad_rows=true"]), log=lambda _: None)
    assert source.skipped == 1 and len(source.rows) == 1


def test_eval_set_is_fixed_and_balanced():
    problems = synthetic_eval_set([1, 2, 3], 5, seed=7)
    assert problems == synthetic_eval_set([1, 2, 3], 5, seed=7)
    assert [p.level for p in problems] == ["1"] * 5 + ["2"] * 5 + ["3"] * 5


def test_aggregate_by_mode_and_level():
    records = [EvalRecord("natural", "1", True, 10, False), EvalRecord("natural", "1", False, 30, False),
               EvalRecord("natural", "2", True, 50, False), EvalRecord("16", "1", True, 4, False),
               EvalRecord("16", "2", False, 96, True)]
    table = aggregate(records)
    assert list(table) == ["natural", "16"]
    assert table["natural"]["1"] == {"accuracy": 0.5, "mean_tokens": 20.0, "truncation_rate": 0.0, "samples": 2}
    assert table["natural"]["all"]["accuracy"] == pytest.approx(2 / 3)
    assert table["16"]["2"]["truncation_rate"] == 1.0
    text = format_table(table)
    assert "| natural | 50.0% / 20.0 | 100.0% / 50.0 | 66.7% / 30.0 |" in text


def test_comparison_table_of_run_summaries(tmp_path):
    from megatron_hbpo.report import comparison_table, main, plot_summary

    def summary(before: float, after: float) -> dict:
        cell = {"before": {"accuracy": before, "mean_tokens": 50.0}, "after": {"accuracy": after, "mean_tokens": 12.5}}
        return {"recipe": "x", "levels": {"1": cell, "all": cell}, "budgets": {"16": {"1": cell}}}

    text = comparison_table({"hbpo": summary(0.9, 0.95), "grpo": summary(0.9, 0.5)})
    assert text.splitlines()[2] == "| base | 90.0% / 50.0 | 90.0% / 50.0 |"
    assert text.splitlines()[4] == "| grpo | 50.0% / 12.5 | 50.0% / 12.5 |"
    grpo_without_budgets = dict(summary(0.9, 0.5), budgets={})
    by_budget = comparison_table({"hbpo": summary(0.9, 0.95), "grpo": grpo_without_budgets}, mode="16")
    assert by_budget.splitlines()[3:] == ["| hbpo | 95.0% / 12.5 |", "| grpo | - |"]
    run = tmp_path / "hbpo"
    run.mkdir()
    (run / "summary.json").write_text(__import__("json").dumps(summary(0.9, 0.95)))
    assert main([str(run)]) == 0
    plot_summary(summary(0.9, 0.95), tmp_path / "s.png", baselines={"grpo": summary(0.9, 0.5)})
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
