"""Budget subgroups and the budget prefix (HBPO_SPEC.md s1), with real chat templates."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_hbpo.algo.budgets import add_think_prefix, assign_budgets, build_prompt

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


def test_assign_budgets_even_contiguous_subgroups():
    assert assign_budgets(8, [16, 32, 48, 64]) == [16, 16, 32, 32, 48, 48, 64, 64]
    assert assign_budgets(16, [512, 1024, 2048, 2560]).count(2048) == 4
    assert assign_budgets(3, []) == [None, None, None]
    with pytest.raises(ValueError, match="multiple"):
        assign_budgets(6, [1, 2, 3, 4])


def test_budget_prefix_after_plain_generation_prompt():
    tok = make_tokenizer(QWEN_LIKE)
    prompt = build_prompt(tok, "What is 2+2?", 512)
    assert prompt == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
                      "<think> I will answer the question within 512 tokens")


def test_no_second_think_when_the_template_opens_it():
    tok = make_tokenizer(R1_LIKE)
    prompt = build_prompt(tok, "What is 2+2?", 1024)
    assert prompt.count("<think>") == 1
    assert prompt == "<|User|>What is 2+2?<|Assistant|><think>\nI will answer the question within 1024 tokens"
    # And without a trailing newline the sentence keeps its space.
    assert add_think_prefix("<A><think>", " I will") == "<A><think> I will"


def test_natural_and_efficiency_modes_and_custom_template():
    tok = make_tokenizer(QWEN_LIKE)
    natural = build_prompt(tok, "Q", None)
    assert natural == build_prompt(tok, "Q", "natural") and "<think>" not in natural
    assert build_prompt(tok, "Q", "efficiency").endswith("<think> I will answer the question with minimal tokens")
    custom = build_prompt(tok, "Q", 64, template=" Budget: {budget}.", system_prompt="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>") and custom.endswith("<think> Budget: 64.")
    with pytest.raises(ValueError, match="prompt mode"):
        build_prompt(tok, "Q", "budget")
