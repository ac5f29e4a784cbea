"""The synthetic task, its tokenizer, the prompt stream, the warm-up data and the eval tables."""

from __future__ import annotations

import random

import pytest

from megatron_hbpo.algo.verify import extract_final_answer
from megatron_hbpo.config import DataConfig, load_recipe
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
from megatron_hbpo.data.prompts import DataError
from megatron_hbpo.data.source import PromptSource, eval_set
from megatron_hbpo.data.synthetic import STEP_TOKENS, STYLES, VERBOSE_TOKENS, Problem, make_problem, response_text, style_mix_sample, \
    task_tokenizer

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
    prompt = PromptBuilder(tokenizer, PromptFormat(template="{problem}")).text("last digit of a2+b9+c1", "budget:48")
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
    source = PromptSource(recipe.data, recipe.train.seed)
    assert source.batch(3, 16) == PromptSource(recipe.data, recipe.train.seed).batch(3, 16)
    assert source.batch(3, 16) != source.batch(4, 16)
    assert {p.level for p in source.batch(0, 200)} == {"1", "2", "3", "4"}
    # Files: epochs are fresh permutations, every row once per epoch.
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"problem": "p{i}", "answer": "{i}"}}\n' for i in range(10)))
    files = load_recipe(RECIPE, ["data.source=files", f"data.train_files=[{data}]", "warmup.steps=0",
                                 "model.tokenizer_path=unused",
                                 "eval.before_after=false"])
    stream = PromptSource(files.data, files.train.seed)
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
        PromptSource(load_recipe(RECIPE, base).data, 0)
    source = PromptSource(load_recipe(RECIPE, base + ["data.skip_bad_rows=true"]).data, 0, log=lambda _: None)
    assert source.skipped == 1 and len(source.rows) == 1


def test_eval_set_is_fixed_and_balanced():
    data = DataConfig(source="synthetic", synthetic_levels=[1, 2, 3])
    problems = eval_set(data, 5, seed=7)
    assert problems == eval_set(data, 5, seed=7)
    assert [p.level for p in problems] == ["1"] * 5 + ["2"] * 5 + ["3"] * 5
