"""The embedded default's task: last digit of a sum, with graded difficulty, and its tokenizer.

A level-l problem is "last digit of a3+b5+c2+d7+e1" (l + 1 tagged one-digit operands, l
additions). The warm-up data answers it in four styles:

    concise   </think>\\boxed{8}                                    4 tokens whatever the level
    steps     3+b5=8;8+c2=0;0+d7=7;7+e1=8;</think>\\boxed{8}         7 tokens per addition + 4
    checked   3+b5=8; ok8+c2=1; no8+c2=0; ok...</think>\\boxed{8}    8 per addition (+8 per caught error) + 4
    verbose   checked, then " check" lines re-doing additions until ~VERBOSE_TOKENS: over-thinking

The base is sloppy: an addition's first result is wrong with probability `error_rate`. Unchecked
steps carry the error into the answer, so their accuracy falls with the level ((1 - p)^l); the
verdict after each line catches it in the checked styles. A tiny transformer also cannot add l
digits in one jump, so the concise answer is a guess beyond the easy levels. Longer reasoning
therefore pays off exactly where the problem needs it, which gives a budget prompt something to
control; the verbose style costs the same at every level, like an over-thinking reasoning model.

The tokenizer is word-level with one token per digit, sign, word and tag, so response lengths are
the token counts above; it is a regular `transformers` fast tokenizer with a chat template, so the
same prompt-building, vLLM and verifier code paths run as for a real model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

Style = Literal["concise", "steps", "checked", "verbose"]
STYLES: tuple[Style, ...] = ("concise", "steps", "checked", "verbose")
# Operands are tagged a, b, c, ... in the problem and the chain names the one it adds: a lookup by
# content, which a two-layer model learns far more reliably than "the k-th operand" by position.
TAGS = "abcdefghij"
STEP_TOKENS = 7  # "8+c2=0;"
# Part of the warm-up fingerprint: bump when the task's text changes, so that an old warm-up is not reused.
TASK_VERSION = 1
VERBOSE_TOKENS = 56  # the verbose chain is padded with check lines to at least this many tokens

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
WORDS = ["last", "digit", "of", "I", "will", "answer", "the", "question", "within", "tokens", "with",
         "minimal", "check", "ok", "no"]
# L1's length sentences (" Think for [maximum] N tokens."), appended after the original vocabulary so
# that every earlier token keeps its id (and the warm-up, its weights).
L1_WORDS = ["Think", "for", "maximum"]
# The forced-summary inserts of AnytimeReasoner ("...\n\n...\n\n</think>" and "\n\n**Final Answer**\n",
# docs/anytime.md), appended last and only for the anytime recipes (task_tokenizer(summary_markers=True)),
# so that the other recipes' tokenizer is unchanged.
# "...", "\n\n" and "**" are one token each, so the inserts are 5 and 6 tokens (R1-Distill's: 5 and 3).
SUMMARY_WORDS = ["Final", "Answer"]
SUMMARY_TOKEN_PATTERN = r"\.\.\.|\n\n|\*\*|"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# One token per tag, word (with or without its leading space), digit (idem), sign, or a lone space.
TOKEN_PATTERN = r"<\|[a-z]+\|>|</?think>|\\boxed\{| ?[A-Za-z]+| ?[0-9]|[^A-Za-z0-9 ]| "


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    level: int

    @property
    def text(self) -> str:
        return "last digit of " + "+".join(f"{tag}{d}" for tag, d in zip(TAGS, self.operands))

    @property
    def answer(self) -> str:
        return str(sum(self.operands) % 10)


def make_problem(rng: random.Random, level: int) -> Problem:
    if not 1 <= level < len(TAGS):
        raise ValueError(f"a problem level is in 1..{len(TAGS) - 1}, got {level}")
    return Problem(tuple(rng.randrange(10) for _ in range(level + 1)), level)


def _step_line(total: int, tag: str, operand: int, result: int) -> str:
    return f"{total}+{tag}{operand}={result};"


def _wrong_digit(rng: random.Random, right: int) -> int:
    return (right + rng.randrange(1, 10)) % 10


def response_text(problem: Problem, style: Style, *, rng: random.Random | None = None, error_rate: float = 0.0,
                  think_open: str = "", think_close: str = "</think>") -> str:
    """The response in one style. `think_open`: "<think>" where the prompt does not already hold it
    (natural mode: the model opens its own thinking block).

    error_rate: the chance that an addition's first result is wrong (a sloppy base model). In the
    "steps" style the error stands and propagates to the answer; in "checked" and "verbose" the
    verdict after the line (" no") catches it and a corrected line follows, so those styles are
    right at the price of their length.
    """
    if style not in STYLES:
        raise ValueError(f"unknown response style {style!r}; expected one of {STYLES}")
    if error_rate and rng is None:
        raise ValueError("error_rate needs an rng")
    total, lines, right_lines, caught = problem.operands[0], [], [], 0
    for tag, operand in zip(TAGS[1:], problem.operands[1:]):
        right = (total + operand) % 10
        result = _wrong_digit(rng, right) if rng is not None and error_rate and rng.random() < error_rate else right
        line = _step_line(total, tag, operand, result)
        if style == "steps":
            lines.append(line)
            total = result  # nothing catches the error
            continue
        if result != right:
            line += " no" + _step_line(total, tag, operand, right)
            caught += 1
        lines.append(line + " ok")
        right_lines.append(_step_line(total, tag, operand, right))
        total = right
    body = "".join(lines) if style != "concise" else ""
    if style == "verbose":
        # Over-thinking: re-check the additions in turn until the chain is VERBOSE_TOKENS long,
        # ending on the last one, so the answer follows the line that computed it.
        tokens = (len(lines) + caught) * (STEP_TOKENS + 1)  # each line and each correction + its verdict
        checks = max(0, -(-(VERBOSE_TOKENS - tokens) // (STEP_TOKENS + 1)))
        n = len(right_lines)
        body += "".join(" check" + right_lines[(n - checks + i) % n] for i in range(checks))
    answer = str(total) if style != "concise" else problem.answer
    return think_open + body + f"{think_close}\\boxed{{{answer}}}"


def task_tokenizer(*, summary_markers: bool = False) -> Any:
    """The task's word-level fast tokenizer, with eos/pad `<|endoftext|>` and a chat template.
    summary_markers: also the newline and the words of the forced-summary inserts (AnytimeReasoner)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = list(SPECIAL_TOKENS) + ["<think>", "</think>", "\\boxed{", " "]
    vocab_list += [d for n in range(10) for d in (str(n), f" {n}")]
    vocab_list += [w for word in WORDS + list(TAGS) for w in (word, f" {word}")]
    vocab_list += list("+=;}{.,?!:-*/()%")
    vocab_list += [w for word in L1_WORDS for w in (word, f" {word}")]
    if summary_markers:
        vocab_list += ["...", "\n\n", "**", "\n", *(w for word in SUMMARY_WORDS for w in (word, f" {word}"))]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    pattern = SUMMARY_TOKEN_PATTERN + TOKEN_PATTERN if summary_markers else TOKEN_PATTERN
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 unk_token="<unk>")
    hf.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def style_mix_sample(rng: random.Random, mix: dict[str, float]) -> Style:
    """Draw a style with probabilities proportional to `mix` (keys from STYLES)."""
    unknown = set(mix) - set(STYLES)
    if unknown:
        raise ValueError(f"unknown response styles {sorted(unknown)}; expected some of {STYLES}")
    styles = [s for s in STYLES if mix.get(s, 0) > 0]
    return rng.choices(styles, weights=[mix[s] for s in styles])[0]
