"""Prompts: the budget prefix with real chat templates, mode names, and one prompt for training and evaluation."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_hbpo.algo.methods import method_for
from megatron_hbpo.config import AlgoConfig, DataConfig
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat, add_think_prefix, fill_template, parse_mode
from megatron_hbpo.rollout.engine import SamplingSettings
from megatron_hbpo.rollout.requests import build_requests

QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Recent DeepSeek-R1-Distill templates open the thinking block themselves.
R1_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def make_tokenizer(template: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    hf.chat_template = template
    return hf


def text(tok, problem, mode, **fmt):
    return PromptBuilder(tok, PromptFormat(template="{problem}", **fmt)).text(problem, mode)


def test_budget_prefix_after_plain_generation_prompt():
    tok = make_tokenizer(QWEN_LIKE)
    assert text(tok, "What is 2+2?", "budget:512") == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
                                                        "<think> I will answer the question within 512 tokens")


def test_no_second_think_when_the_template_opens_it():
    tok = make_tokenizer(R1_LIKE)
    prompt = text(tok, "What is 2+2?", "budget:1024")
    assert prompt.count("<think>") == 1
    assert prompt == "<|User|>What is 2+2?<|Assistant|><think>\nI will answer the question within 1024 tokens"
    # And without a trailing newline the sentence keeps its space.
    assert add_think_prefix("<A><think>", " I will") == "<A><think> I will"


def test_natural_and_efficiency_modes_and_custom_template():
    tok = make_tokenizer(QWEN_LIKE)
    natural = text(tok, "Q", "natural")
    assert "<think>" not in natural and natural.endswith("<|im_start|>assistant\n")
    assert text(tok, "Q", "efficiency").endswith("<think> I will answer the question with minimal tokens")
    custom = text(tok, "Q", "budget:64", budget_template=" Budget: {budget}.", system_prompt="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>") and custom.endswith("<think> Budget: 64.")
    with pytest.raises(ValueError, match="prompt mode"):
        text(tok, "Q", "budget")


def test_mode_names_are_written_one_way():
    assert [parse_mode(m) for m in ("natural", "efficiency", " budget:512 ", "budget:0064")] == [
        "natural", "efficiency", "budget:512", "budget:64"]
    for bad in ("budget:", "budget:-1", "budget:0", "512", "fast"):
        with pytest.raises(ValueError, match="prompt mode"):
            parse_mode(bad)


def test_only_the_problem_placeholder_is_substituted():
    template = "{problem} Put the answer in \\boxed{} and keep {braces} and {{doubled}}."
    assert fill_template(template, "What is {x}?") == (
        "What is {x}? Put the answer in \\boxed{} and keep {braces} and {{doubled}}.")


@pytest.mark.parametrize("template", [QWEN_LIKE, R1_LIKE])
def test_training_and_evaluation_build_the_same_prompt_ids(template):
    """The rollout requests of a step and the evaluation harness prompt the same problem alike."""
    from tiny_models import bpe_tokenizer

    tok = bpe_tokenizer(template)
    algo = AlgoConfig(budgets=[16, 32])
    data = DataConfig(prompt_template="Solve: {problem} Answer in \\boxed{}.")
    prompts = PromptBuilder(tok, PromptFormat.of(data, algo))
    method = method_for(algo, l_max=64, temperature=1.0)
    requests = build_requests(prompts, ["2 + 3 = ?"], method.prompt_modes(4), sampling=SamplingSettings())
    for request, mode in zip(requests, ("budget:16", "budget:32")):
        assert request.prompt_ids == prompts.ids("2 + 3 = ?", mode)
        # ... and both are the tokenisation of the rendered text, nothing added or merged.
        assert request.prompt_ids == tok(prompts.text("2 + 3 = ?", mode), add_special_tokens=False)["input_ids"]
        assert "Answer in \\boxed{}." in tok.decode(request.prompt_ids)


def test_l1_length_modes_end_the_user_turn_with_a_target_read_back_as_data():
    from megatron_hbpo.data.chat import length_mode, mode_budget, mode_length_instruction, mode_target

    for template in (QWEN_LIKE, R1_LIKE):
        tok = make_tokenizer(template)
        exact, maximum = text(tok, "What is 2+2?", "length:300"), text(tok, "What is 2+2?", "max_length:300")
        natural = text(tok, "What is 2+2?", "natural")
        assert exact == natural.replace("What is 2+2?", "What is 2+2? Think for 300 tokens.")
        assert maximum == natural.replace("What is 2+2?", "What is 2+2? Think for maximum 300 tokens.")
    assert (length_mode(300, "exact"), length_mode(300, "max")) == ("length:300", "max_length:300")
    assert parse_mode(" max_length:0300 ") == "max_length:300" and parse_mode("length:7") == "length:7"
    assert mode_target("budget:512") == (512, "max") and mode_target("max_length:300") == (300, "max")
    assert mode_target("length:300") == (300, "exact") and mode_target("natural") is None
    assert mode_length_instruction("budget:512") is None and mode_budget("length:300") is None
    for bad in ("length:0", "max_length:", "length:x", "exact:300"):
        with pytest.raises(ValueError, match="length:N or max_length:N"):
            parse_mode(bad)
