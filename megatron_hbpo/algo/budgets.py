"""Budget subgroups and the budget prefix (HBPO_SPEC.md s1).

A prompt's n rollouts are split into k equal subgroups, subgroup i generated under budget b_i.
The budget is told to the model by starting the assistant turn with `<think>` and a sentence
("<think> I will answer the question within 512 tokens"). The prefix is prompt: not generated,
no loss, not counted in the response length. Each sample's budget is kept as data.
"""

from __future__ import annotations

from typing import Any, Sequence

DEFAULT_BUDGETS = (512, 1024, 2048, 2560)
BUDGET_TEMPLATE = " I will answer the question within {budget} tokens"
EFFICIENCY_SENTENCE = " I will answer the question with minimal tokens"
THINK_OPEN = "<think>"


def assign_budgets(n_rollouts: int, budgets: Sequence[int]) -> list[int | None]:
    """The budget of each of one prompt's n rollouts: k contiguous subgroups of n / k.

    An empty `budgets` (GRPO) gives n unbudgeted rollouts (None).
    """
    if n_rollouts < 1:
        raise ValueError(f"n_rollouts must be >= 1, got {n_rollouts}")
    if not budgets:
        return [None] * n_rollouts
    k = len(budgets)
    if n_rollouts % k:
        raise ValueError(f"n_rollouts={n_rollouts} is not a multiple of the {k} budgets {list(budgets)}")
    per_budget = n_rollouts // k
    return [b for b in budgets for _ in range(per_budget)]


def budget_sentence(budget: int, template: str = BUDGET_TEMPLATE) -> str:
    return template.format(budget=budget)


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


def render_chat_prompt(tokenizer: Any, user_text: str, *, system_prompt: str | None = None) -> str:
    """The chat template's rendering of one user turn, ending with the assistant generation prompt."""
    messages = [{"role": "user", "content": user_text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(
    tokenizer: Any,
    user_text: str,
    mode: int | str | None,
    *,
    template: str = BUDGET_TEMPLATE,
    think_open: str = THINK_OPEN,
    system_prompt: str | None = None,
) -> str:
    """The full prompt text for one rollout.

    mode: an int budget (HBPO training, "budget:N" evaluation), "efficiency" (efficiency prompting),
    or None / "natural" (natural reasoning: the chat template alone, no prefix).
    """
    rendered = render_chat_prompt(tokenizer, user_text, system_prompt=system_prompt)
    if mode is None or mode == "natural":
        return rendered
    if mode == "efficiency":
        return add_think_prefix(rendered, EFFICIENCY_SENTENCE, think_open=think_open)
    if isinstance(mode, int) and not isinstance(mode, bool):
        return add_think_prefix(rendered, budget_sentence(mode, template), think_open=think_open)
    raise ValueError(f"prompt mode must be a budget (int), 'efficiency', 'natural' or None; got {mode!r}")
