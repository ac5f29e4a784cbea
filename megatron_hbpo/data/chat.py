"""Prompts as the model sees them: the user turn, the chat template, and the prompt mode.

One builder serves training rollouts, the supervised warm-up, in-training evaluation and the
benchmark harness, so that the same problem in the same mode always becomes the same token ids.

Prompt modes, always written as these strings (in recipes, result files, tables and flags):

    natural       the chat template alone: the model opens its thinking block itself
    efficiency    `<think>` + " I will answer the question with minimal tokens"
    budget:N      `<think>` + " I will answer the question within N tokens" (HBPO's budget prefix)

The prefix after `<think>` is prompt, not response: it is never generated, trained or counted in
the response length (docs/method.md, "Hierarchical budget exploration").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_hbpo.algo.budgets import budget_sentence
from megatron_hbpo.algo.constants import BUDGET_TEMPLATE, EFFICIENCY_SENTENCE, PROMPT_TEMPLATE, THINK_OPEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from megatron_hbpo.config import AlgoConfig, DataConfig

NATURAL = "natural"
EFFICIENCY = "efficiency"
_BUDGET = "budget:"


def budget_mode(budget: int) -> str:
    """The mode name of a budget: 512 -> "budget:512"."""
    return f"{_BUDGET}{int(budget)}"


def mode_budget(mode: str) -> int | None:
    """The budget a mode states ("budget:512" -> 512), None for natural and efficiency."""
    return int(mode[len(_BUDGET):]) if mode.startswith(_BUDGET) else None


def parse_mode(text: str) -> str:
    """Validate a mode name (natural, efficiency or budget:N with N > 0) and return it normalised."""
    text = text.strip()
    if text in (NATURAL, EFFICIENCY):
        return text
    number = text[len(_BUDGET):] if text.startswith(_BUDGET) else ""
    if number.isdigit() and int(number) > 0:
        return budget_mode(int(number))
    raise ValueError(f"prompt mode must be natural, efficiency or budget:N (N > 0 tokens), got {text!r}")


def fill_template(template: str, problem: str) -> str:
    """The user turn: `template` with `{problem}` replaced; every other brace (`\\boxed{}`) stays as written."""
    return template.replace("{problem}", problem)


def add_think_prefix(prompt: str, sentence: str, *, think_open: str = THINK_OPEN) -> str:
    """Append `<think>` + `sentence` to a rendered prompt that ends with the generation prompt.

    If the chat template already opened the thinking block (recent DeepSeek-R1-Distill templates end
    with `<think>\\n`), only the sentence is added: never a second `<think>`. After a template's
    trailing newline the sentence's leading space is dropped, so the text reads as one line.
    """
    stripped = prompt.rstrip()
    if stripped.endswith(think_open):
        if stripped != prompt:
            return prompt + sentence.lstrip()
        return prompt + sentence
    return prompt + think_open + sentence


def render_chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, *, system_prompt: str | None = None) -> str:
    """The chat template's rendering of one user turn, ending with the assistant generation prompt."""
    messages = [{"role": "user", "content": user_text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes a prompt: the recipe's data.prompt_template / system_prompt and the
    algorithm's budget sentence and thinking tag."""

    template: str = PROMPT_TEMPLATE
    system_prompt: str | None = None
    budget_template: str = BUDGET_TEMPLATE
    think_open: str = THINK_OPEN

    @classmethod
    def of(cls, data: DataConfig, algo: AlgoConfig) -> PromptFormat:
        """From a recipe's `data` and `algo` sections."""
        return cls(template=data.prompt_template, system_prompt=data.system_prompt,
                   budget_template=algo.budget_template, think_open=algo.think_open)


class PromptBuilder:
    """Problem + mode -> prompt text and ids, with one tokenizer and one PromptFormat."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat):
        self.tokenizer = tokenizer
        self.format = fmt

    def text(self, problem: str, mode: str = NATURAL) -> str:
        f = self.format
        rendered = render_chat_prompt(self.tokenizer, fill_template(f.template, problem), system_prompt=f.system_prompt)
        if mode == NATURAL:
            return rendered
        if mode == EFFICIENCY:
            return add_think_prefix(rendered, EFFICIENCY_SENTENCE, think_open=f.think_open)
        budget = mode_budget(parse_mode(mode))
        assert budget is not None  # parse_mode accepted it and it is neither natural nor efficiency
        return add_think_prefix(rendered, budget_sentence(budget, f.budget_template), think_open=f.think_open)

    def ids(self, problem: str, mode: str = NATURAL) -> list[int]:
        return self.many([(problem, mode)])[0]

    def many(self, items: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Ids of several (problem, mode) prompts; one batched tokenizer call (about 10x faster than one
        call per prompt with a fast tokenizer)."""
        if not items:
            return []
        texts = [self.text(problem, mode) for problem, mode in items]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
