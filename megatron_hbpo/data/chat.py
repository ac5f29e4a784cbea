"""Prompts as the model sees them: the user turn, the chat template, and the prompt mode.

One builder serves training rollouts, the supervised warm-up, in-training evaluation and the
benchmark harness, so that the same problem in the same mode always becomes the same token ids.

Prompt modes, always written as these strings (in recipes, result files, tables and flags):

    natural       the chat template alone: the model opens its thinking block itself
    efficiency    `<think>` + " I will answer the question with minimal tokens"
    budget:N      `<think>` + " I will answer the question within N tokens" (HBPO's budget prefix)
    length:N      the user turn + " Think for N tokens." (L1's exact target, docs/baselines.md)
    max_length:N  the user turn + " Think for maximum N tokens." (L1's maximum target)

The prefix after `<think>` is prompt, not response: it is never generated, trained or counted in
the response length (docs/method.md, "Hierarchical budget exploration"). L1's sentence ends the user
turn, before the chat template; nothing is added to the assistant turn.

`mode_target` gives the length a mode asks for and its kind: a maximum ("max": budget:N,
max_length:N) or a length to hit ("exact": length:N); budget adherence is measured against it.
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
# L1's two length sentences, by the kind of target they state (mode name prefix -> kind).
_LENGTH_PREFIXES = {"length:": "exact", "max_length:": "max"}
_TARGET_PREFIXES = {_BUDGET: "max", **_LENGTH_PREFIXES}


def budget_mode(budget: int) -> str:
    """The mode name of a budget: 512 -> "budget:512"."""
    return f"{_BUDGET}{int(budget)}"


def mode_budget(mode: str) -> int | None:
    """The budget a mode states ("budget:512" -> 512), None for natural and efficiency."""
    return int(mode[len(_BUDGET):]) if mode.startswith(_BUDGET) else None


def length_mode(target: int, kind: str) -> str:
    """The mode name of an L1 target: (512, "exact") -> "length:512", (512, "max") -> "max_length:512"."""
    prefix = {v: k for k, v in _LENGTH_PREFIXES.items()}.get(kind)
    if prefix is None:
        raise ValueError(f"an L1 target's kind is exact or max, got {kind!r}")
    return f"{prefix}{int(target)}"


def _split(mode: str, prefixes: dict[str, str]) -> tuple[int, str] | None:
    for prefix, kind in prefixes.items():
        if mode.startswith(prefix):
            return int(mode[len(prefix):]), kind
    return None


def mode_target(mode: str) -> tuple[int, str] | None:
    """(N, kind) of a mode that asks for a length: budget:N and max_length:N -> (N, "max"), length:N
    -> (N, "exact"); None for natural and efficiency."""
    return _split(mode, _TARGET_PREFIXES)


def mode_length_instruction(mode: str) -> tuple[int, str] | None:
    """(N, L1 mode "exact" | "max") of an L1 length mode (length:N, max_length:N), else None."""
    return _split(mode, _LENGTH_PREFIXES)


def parse_mode(text: str) -> str:
    """Validate a mode name (natural, efficiency, budget:N, length:N or max_length:N with N > 0) and
    return it normalised."""
    text = text.strip()
    if text in (NATURAL, EFFICIENCY):
        return text
    for prefix in _TARGET_PREFIXES:
        number = text[len(prefix):] if text.startswith(prefix) else ""
        if number.isdigit() and int(number) > 0:
            return f"{prefix}{int(number)}"
    raise ValueError(f"prompt mode must be natural, efficiency, budget:N, length:N or max_length:N (N > 0 tokens), "
                     f"got {text!r}")


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
        user = fill_template(f.template, problem)
        length = mode_length_instruction(parse_mode(mode)) if mode != NATURAL else None
        if length is not None:
            # Imported here: the mode names above stay importable without torch (config.py checks them).
            from megatron_hbpo.algo.l1 import append_length_instruction

            user = append_length_instruction(user, *length)
        rendered = render_chat_prompt(self.tokenizer, user, system_prompt=f.system_prompt)
        if mode == NATURAL or length is not None:
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
