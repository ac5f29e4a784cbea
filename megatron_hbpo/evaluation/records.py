"""The one response record of every evaluation, and how a generated sample becomes one.

A record keeps what the metrics need (verdict, tokens without eos, the thinking/answer split at
`</think>`, truncation, reflection keywords) and the text, for the samples file. A truncated
response scores incorrect even when an answer can be extracted from it, as in the reward, where a
truncation is a format error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from megatron_hbpo.algo.constants import THINK_CLOSE

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier

# Self-reflection / hesitation markers counted per response (whole words, any case). Longer
# keywords are matched first, so "double-check" is not also a "check".
REFLECTION_KEYWORDS = ("wait", "hmm", "alternatively", "but", "however", "double-check", "verify", "check")


@dataclass
class ScoredResponse:
    benchmark: str
    setting: str  # the prompt mode (data/chat.py): natural, efficiency, budget:N
    problem_index: int
    level: str | None
    correct: bool  # verifier says equivalent, and the response was not truncated
    tokens: int  # response tokens, eos excluded
    thinking_tokens: int  # before `</think>`; all tokens when there is none
    answer_tokens: int  # after `</think>`; 0 when there is none
    closed_thinking: bool  # a `</think>` was generated
    truncated: bool  # stopped at max_tokens
    status: str  # the verifier's status (ok, no_answer, timeout, crash, error)
    answer: str | None  # the extracted final answer
    gold: str
    reflections: dict[str, int] = field(default_factory=dict)  # keyword -> count in the response
    response: str = ""
    budget: int | None = None  # the token budget the prompt stated (budget modes), for adherence
    nothinking: bool = False  # an empty thinking block (`</think>` first): AdaptThink's NoThinking

    def to_json(self) -> dict:
        return asdict(self)


def find_subsequence(sequence: Sequence[int], pattern: Sequence[int]) -> int:
    """Index of the first occurrence of `pattern` in `sequence`, -1 if none (or if pattern is empty)."""
    if not pattern:
        return -1
    seq = list(sequence)
    first, size = pattern[0], len(pattern)
    start = 0
    while True:
        try:
            index = seq.index(first, start)
        except ValueError:
            return -1
        if seq[index:index + size] == list(pattern):
            return index
        start = index + 1


def split_thinking(token_ids: Sequence[int], close_ids: Sequence[int], *, think_close: str = THINK_CLOSE,
                   decode: Callable[[Sequence[int]], str] | None = None) -> tuple[int, int, bool]:
    """(thinking tokens, answer tokens, closed) of one response, eos already removed.

    The thinking part is every token before the first `</think>`, the answer part every token after
    it; the `</think>` tokens themselves (one for reasoning models, where it is a single token) are
    in neither. Without `</think>` the whole response is thinking (a truncated response is still
    thinking when it is cut). `close_ids` is the tokenizer's encoding of `</think>`, found as a run of
    ids; if it is not found there but `decode` shows `</think>` in the text (a tokenizer that spells
    it with other pieces), the span is found by bisection over decoded prefixes and suffixes.
    """
    ids = list(token_ids)
    start = find_subsequence(ids, close_ids)
    if start >= 0:
        return start, len(ids) - start - len(close_ids), True
    if decode is None or think_close not in decode(ids):
        return len(ids), 0, False
    lo, hi = 1, len(ids)  # end: the smallest k with `</think>` in decode(ids[:k])
    while lo < hi:
        mid = (lo + hi) // 2
        if think_close in decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    end = lo
    lo, hi = 0, end - 1  # start: the largest j with `</think>` in decode(ids[j:end])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if think_close in decode(ids[mid:end]):
            lo = mid
        else:
            hi = mid - 1
    return lo, len(ids) - end, True


def keyword_pattern(keywords: Iterable[str]) -> re.Pattern:
    """One case-insensitive regex matching any keyword as a whole word, longest keywords first."""
    words = sorted({k.strip().lower() for k in keywords if k.strip()}, key=lambda k: (-len(k), k))
    if not words:
        raise ValueError("no reflection keywords given")
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)


def count_keywords(text: str, keywords: Sequence[str] = REFLECTION_KEYWORDS,
                   pattern: re.Pattern | None = None) -> dict[str, int]:
    """{keyword: occurrences in text} as whole words, any case ("Wait," counts, "awaited" does not)."""
    counts = {k.strip().lower(): 0 for k in keywords if k.strip()}
    for match in (pattern or keyword_pattern(keywords)).finditer(text):
        counts[match.group(0).lower()] += 1
    return counts


def response_length(token_ids: Sequence[int], eos_token_id: int | None) -> int:
    """Generated tokens with a final eos excluded (the L of the reward, docs/method.md)."""
    return len(token_ids) - int(bool(token_ids) and eos_token_id is not None and token_ids[-1] == eos_token_id)


@dataclass
class Generated:
    """One generated response and what it answers: what the engine returned, before scoring."""

    benchmark: str
    setting: str
    problem_index: int
    level: str | None
    gold: str
    text: str  # decoded response (special tokens skipped, as the verifier reads it)
    token_ids: Sequence[int]  # generated ids, a final eos included if the model stopped on it
    finish_reason: str  # "stop" or "length"
    budget: int | None = None


def score_responses(generated: Sequence[Generated], verifier: AnswerVerifier, *, eos_token_id: int | None,
                    close_ids: Sequence[int], think_close: str = THINK_CLOSE,
                    decode: Callable[[Sequence[int]], str] | None = None,
                    keywords: Sequence[str] = REFLECTION_KEYWORDS, keep_text: bool = True) -> list[ScoredResponse]:
    """Verify each response's final answer against its gold and measure its tokens and keywords."""
    # Here, not at the top: algo/adaptthink imports torch, and tools/evaluate.py imports this module
    # before runtime.configure() sets what torch reads at import (its C++ log level).
    from megatron_hbpo.algo.adaptthink import is_nothinking

    verdicts = verifier.score([g.text for g in generated], [g.gold for g in generated], think_close=think_close)
    pattern = keyword_pattern(keywords)
    records = []
    for g, verdict in zip(generated, verdicts):
        length = response_length(g.token_ids, eos_token_id)
        thinking, answer, closed = split_thinking(list(g.token_ids)[:length], close_ids, think_close=think_close,
                                                  decode=decode)
        truncated = g.finish_reason == "length"
        records.append(ScoredResponse(
            benchmark=g.benchmark, setting=g.setting, problem_index=g.problem_index, level=g.level,
            correct=bool(verdict.correct) and not truncated, tokens=length, thinking_tokens=thinking,
            answer_tokens=answer, closed_thinking=closed, truncated=truncated, status=verdict.status,
            answer=verdict.answer, gold=g.gold, reflections=count_keywords(g.text, keywords, pattern),
            response=g.text if keep_text else "", budget=g.budget,
            nothinking=is_nothinking(g.text, think_close=think_close)))
    return records
