"""Accuracy and response tokens per difficulty level and prompt mode (natural, each budget).

`generate_and_score` runs one mode over a problem set through a rollout engine and the verifier;
`aggregate` turns the per-response records into {level: {accuracy, mean_tokens, ...}} tables. The
trainer uses them for the before/after evaluation of a run and for periodic evaluation.

The second half serves the benchmark harness (tools/evaluate.py): scoring generated responses
(`score_responses`: verdict, tokens without eos, thinking/answer split at `</think>`, reflection
keywords), aggregation per benchmark and difficulty level (`collect_results`), the paper-shaped
Markdown tables, the comparison of two result files, the tokens-per-level plot and atomic JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from megatron_hbpo.algo.budgets import build_prompt

if TYPE_CHECKING:  # torch-free import: tools/evaluate.py --compare needs no torch
    from megatron_hbpo.config import Recipe
    from megatron_hbpo.data.source import TaskPrompt

ALL = "all"


@dataclass
class EvalRecord:
    mode: str  # "natural" or the budget, as text
    level: str
    correct: bool
    tokens: int  # response tokens, eos excluded
    truncated: bool
    response: str = ""  # the decoded response, for the samples file


def mode_name(mode: int | None) -> str:
    return "natural" if mode is None else str(mode)


def generate_and_score(engine: Any, tokenizer: Any, verifier: Any, problems: Sequence[TaskPrompt],
                       mode: int | None, recipe: Recipe) -> list[EvalRecord]:
    """Sample eval.samples_per_problem responses per problem under one prompt mode and score them."""
    from megatron_hbpo.rollout.engine import Request, SamplingSettings

    e, data, algo = recipe.eval, recipe.data, recipe.algo
    sampling = SamplingSettings(temperature=e.temperature, top_p=e.top_p,
                                max_tokens=recipe.rollout.max_response_length)
    requests = []
    for index, problem in enumerate(problems):
        text = build_prompt(tokenizer, data.prompt_template.format(problem=problem.problem), mode,
                            template=algo.budget_template, think_open=algo.think_open,
                            system_prompt=data.system_prompt)
        requests.append(Request(prompt_ids=tokenizer(text, add_special_tokens=False)["input_ids"],
                                n=e.samples_per_problem, budget=mode, sampling=sampling, group_id=index))
    samples = engine.generate(requests)
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    golds = [problems[s.group_id].answer for s in samples]
    verdicts = verifier.score(texts, golds, think_close=algo.think_close)
    return [EvalRecord(mode=mode_name(mode), level=problems[s.group_id].level or ALL,
                       correct=v.correct and not s.truncated, tokens=s.length, truncated=s.truncated,
                       response=text)
            for s, v, text in zip(samples, verdicts, texts)]


def aggregate(records: Sequence[EvalRecord]) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {level or "all": {accuracy, mean_tokens, truncation_rate, samples}}}, levels sorted."""
    groups: dict[tuple[str, str], list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[(r.mode, r.level)].append(r)
        groups[(r.mode, ALL)].append(r)
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)

    for (mode, level) in sorted(groups, key=lambda k: (k[0] != "natural", k[0].zfill(8), level_sort_key(k[1]))):
        rs = groups[(mode, level)]
        table[mode][level] = {"accuracy": sum(r.correct for r in rs) / len(rs),
                              "mean_tokens": sum(r.tokens for r in rs) / len(rs),
                              "truncation_rate": sum(r.truncated for r in rs) / len(rs), "samples": len(rs)}
    return dict(table)


def sample_rows(records: Sequence[EvalRecord], per_group: int = 4) -> list[dict]:
    """The first `per_group` responses of each (mode, level): what the numbers look like as text."""
    seen: dict[tuple[str, str], int] = defaultdict(int)
    rows = []
    for r in records:
        if seen[(r.mode, r.level)] < per_group:
            seen[(r.mode, r.level)] += 1
            rows.append({"mode": r.mode, "level": r.level, "correct": r.correct, "tokens": r.tokens,
                         "response": r.response})
    return rows


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows = modes, columns = levels; cells 'accuracy% / mean tokens'."""
    levels = list(dict.fromkeys(level for per_mode in table.values() for level in per_mode))
    lines = ["| mode | " + " | ".join(f"level {lv}" if lv != ALL else "all" for lv in levels) + " |",
             "|---" * (len(levels) + 1) + "|"]
    for mode, per_level in table.items():
        cells = [f"{100 * per_level[lv]['accuracy']:.1f}% / {per_level[lv]['mean_tokens']:.1f}"
                 if lv in per_level else "-" for lv in levels]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ================================================================================================
# Benchmark evaluation (tools/evaluate.py): accuracy and token usage per benchmark and setting.
#
# Everything below is pure (no vLLM, no model): the CLI generates, these functions score, split,
# count, aggregate and format, so that they can be tested against hand-made outputs.
# ================================================================================================

RESULT_FORMAT = 1
# Self-reflection / hesitation markers counted per response (whole words, any case). The issue names
# wait, alternatively, but, hmm; the rest are common companions in long-CoT analyses. `--keywords`
# replaces the list. Longer keywords are matched first, so "double-check" is not also a "check".
REFLECTION_KEYWORDS = ("wait", "hmm", "alternatively", "but", "however", "double-check", "verify", "check")
# Display names of the paper's benchmarks; any other name is shown as given.
BENCHMARK_TITLES = {"gsm8k": "GSM8K", "math500": "MATH500", "olympiadbench": "Olympiad", "olympiad": "Olympiad",
                    "aime24": "AIME24", "aime25": "AIME25", "amc": "AMC", "amc23": "AMC23"}


def parse_setting(text: str) -> int | str | None:
    """'natural' -> None, 'efficiency' -> 'efficiency', 'budget:N' -> N (the build_prompt modes)."""
    text = text.strip()
    if text == "natural":
        return None
    if text == "efficiency":
        return "efficiency"
    if text.startswith("budget:") and text[len("budget:"):].isdigit() and int(text[len("budget:"):]) > 0:
        return int(text[len("budget:"):])
    raise ValueError(f"setting must be natural, efficiency or budget:N (N > 0 tokens), got {text!r}")


def setting_name(mode: int | str | None) -> str:
    """Inverse of parse_setting: the name used in result files and tables."""
    if mode is None or mode == "natural":
        return "natural"
    if mode == "efficiency":
        return "efficiency"
    return f"budget:{int(mode)}"


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


@dataclass
class ScoredResponse:
    benchmark: str
    setting: str
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
    reflections: dict[str, int]  # keyword -> count in the response
    response: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics (numpy's
    default): position q * (n - 1) in the sorted values. NaN for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def token_stats(values: Sequence[float]) -> dict[str, float]:
    """{mean, median, p90} of a list of token counts (NaN for an empty list)."""
    return {"mean": sum(values) / len(values) if values else math.nan,
            "median": percentile(values, 0.5), "p90": percentile(values, 0.9)}


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


def split_thinking(token_ids: Sequence[int], close_ids: Sequence[int], *, think_close: str = "</think>",
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
    """Generated tokens with a final eos excluded (the L of HBPO_SPEC.md s2)."""
    return len(token_ids) - int(bool(token_ids) and eos_token_id is not None and token_ids[-1] == eos_token_id)


def score_responses(generated: Sequence[Generated], verifier: Any, *, eos_token_id: int | None,
                    close_ids: Sequence[int], think_close: str = "</think>",
                    decode: Callable[[Sequence[int]], str] | None = None,
                    keywords: Sequence[str] = REFLECTION_KEYWORDS, keep_text: bool = True) -> list[ScoredResponse]:
    """Verify each response's final answer against its gold and measure its tokens and keywords.

    A truncated response scores incorrect even if an answer can be extracted from it (as in the
    trainer's evaluation and the reward: truncated responses are format errors).
    """
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
            response=g.text if keep_text else ""))
    return records


def summarize(records: Sequence[ScoredResponse]) -> dict[str, Any]:
    """Metrics of one group of responses (a benchmark, or one of its levels).

    accuracy: pass@1 averaged over the n samples of each problem (the mean of all samples' 0/1,
    every problem having n); tokens: response tokens without eos (mean/median/p90); thinking and
    answer tokens: means over all responses; rates: fractions of responses; reflections: mean
    occurrences per response of each keyword, and of all of them together.
    """
    count = len(records)
    if not count:
        raise ValueError("no responses to summarize")
    tokens = [r.tokens for r in records]
    keywords = list(records[0].reflections)
    per_keyword = {k: sum(r.reflections.get(k, 0) for r in records) / count for k in keywords}
    return {
        "samples": count,
        "problems": len({r.problem_index for r in records}),
        "accuracy": sum(r.correct for r in records) / count,
        "tokens": token_stats(tokens),
        "mean_thinking_tokens": sum(r.thinking_tokens for r in records) / count,
        "mean_answer_tokens": sum(r.answer_tokens for r in records) / count,
        "truncation_rate": sum(r.truncated for r in records) / count,
        "no_think_close_rate": sum(not r.closed_thinking for r in records) / count,
        "format_error_rate": sum(r.status == "no_answer" for r in records) / count,
        "reflections": {"total": sum(per_keyword.values()), "per_keyword": per_keyword},
    }


def level_sort_key(level: Any) -> tuple:
    """Numeric levels (and budgets) in numeric order, then named ones, then "all"."""
    text = str(level)
    numeric = text.lstrip("-").isdigit()
    return (text == ALL, not numeric, int(text) if numeric else 0, text)


def benchmark_metrics(records: Sequence[ScoredResponse]) -> dict[str, Any]:
    """{"all": summary, "levels": {level: summary}} for one benchmark and setting; levels sorted
    numerically (MATH levels 1-5), empty when no record has a level."""
    by_level: dict[str, list[ScoredResponse]] = defaultdict(list)
    for r in records:
        if r.level is not None:
            by_level[str(r.level)].append(r)
    return {"all": summarize(records),
            "levels": {lv: summarize(by_level[lv]) for lv in sorted(by_level, key=level_sort_key)}}


def collect_results(records: Sequence[ScoredResponse]) -> dict[str, dict[str, dict[str, Any]]]:
    """{setting: {benchmark: benchmark_metrics}}, in the order settings and benchmarks first appear."""
    groups: dict[str, dict[str, list[ScoredResponse]]] = {}
    for r in records:
        groups.setdefault(r.setting, {}).setdefault(r.benchmark, []).append(r)
    return {s: {b: benchmark_metrics(rs) for b, rs in per.items()} for s, per in groups.items()}


def average_over_benchmarks(per_benchmark: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The paper's Avg column: the unweighted mean over benchmarks of accuracy and of mean tokens."""
    rows = [m["all"] for m in per_benchmark.values()]
    if not rows:
        return {"accuracy": math.nan, "mean_tokens": math.nan}
    return {"accuracy": sum(r["accuracy"] for r in rows) / len(rows),
            "mean_tokens": sum(r["tokens"]["mean"] for r in rows) / len(rows)}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, flush it to disk, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=1, ensure_ascii=False, allow_nan=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- tables ------------------------------------------------------------------------------------------


def benchmark_title(name: str) -> str:
    return BENCHMARK_TITLES.get(name.lower(), name)


def _cell(accuracy: float, tokens: float) -> str:
    """'82.3/1111': accuracy in %, one decimal / mean response tokens, rounded."""
    if math.isnan(accuracy) or math.isnan(tokens):
        return "-"
    return f"{100 * accuracy:.1f}/{tokens:.0f}"


def _delta_cell(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str:
    """'+2.2/-441 (-39.7%)': accuracy points / tokens, and the relative token change, B - A."""
    if a is None or b is None:
        return "-"
    relative = f" ({100 * (b[1] - a[1]) / a[1]:+.1f}%)" if a[1] else ""
    return f"{100 * (b[0] - a[0]):+.1f}/{b[1] - a[1]:+.0f}{relative}"


def _benchmarks_of(*results: Mapping[str, Any]) -> list[str]:
    names: dict[str, None] = {}
    for result in results:
        for per_benchmark in result["results"].values():
            names.update(dict.fromkeys(per_benchmark))
    return list(names)


def _row_values(per_benchmark: Mapping[str, Any], benchmarks: Sequence[str]) -> list[tuple[float, float] | None]:
    values: list[tuple[float, float] | None] = []
    for name in benchmarks:
        m = per_benchmark.get(name)
        values.append((m["all"]["accuracy"], m["all"]["tokens"]["mean"]) if m else None)
    average = average_over_benchmarks({b: per_benchmark[b] for b in benchmarks if b in per_benchmark})
    values.append((average["accuracy"], average["mean_tokens"]))
    return values


def model_label(result: Mapping[str, Any]) -> str:
    return result.get("label") or Path(str(result.get("model", "model"))).name or "model"


def paper_table(result: Mapping[str, Any]) -> str:
    """The paper's table: one row per setting, cells 'accuracy% / mean tokens' per benchmark + Avg.

    Avg is over the benchmarks the row has (the paper's four when all four are evaluated).
    """
    benchmarks = _benchmarks_of(result)
    lines = ["| model | setting | " + " | ".join(benchmark_title(b) for b in benchmarks) + " | Avg |",
             "|---|---|" + "---|" * (len(benchmarks) + 1)]
    for setting, per_benchmark in result["results"].items():
        cells = [_cell(*v) if v else "-" for v in _row_values(per_benchmark, benchmarks)]
        lines.append(f"| {model_label(result)} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def level_table(result: Mapping[str, Any]) -> str:
    """Per difficulty level of each benchmark that has levels: 'accuracy% / mean tokens'; '' if none."""
    blocks = []
    for setting, per_benchmark in result["results"].items():
        for name, metrics in per_benchmark.items():
            levels = metrics.get("levels") or {}
            if not levels:
                continue
            blocks.append(f"| {benchmark_title(name)} ({setting}) | " + " | ".join(f"level {lv}" for lv in levels)
                          + " | all |\n|---|" + "---|" * (len(levels) + 1) + "\n| accuracy / tokens | "
                          + " | ".join(_cell(m["accuracy"], m["tokens"]["mean"]) for m in levels.values())
                          + f" | {_cell(metrics['all']['accuracy'], metrics['all']['tokens']['mean'])} |")
    return "\n\n".join(blocks)


def details_table(result: Mapping[str, Any]) -> str:
    """Token distribution, thinking/answer split, truncation, format errors and reflections."""
    lines = ["| setting | benchmark | samples | acc % | mean | median | p90 | thinking | answer | truncated % "
             "| no </think> % | no answer % | reflections/resp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, per_benchmark in result["results"].items():
        for name, metrics in per_benchmark.items():
            m = metrics["all"]
            t = m["tokens"]
            lines.append(f"| {setting} | {benchmark_title(name)} | {m['samples']} | {100 * m['accuracy']:.1f} "
                         f"| {t['mean']:.0f} | {t['median']:.0f} | {t['p90']:.0f} | {m['mean_thinking_tokens']:.0f} "
                         f"| {m['mean_answer_tokens']:.0f} | {100 * m['truncation_rate']:.1f} "
                         f"| {100 * m['no_think_close_rate']:.1f} | {100 * m['format_error_rate']:.1f} "
                         f"| {m['reflections']['total']:.2f} |")
    return "\n".join(lines)


def format_report(result: Mapping[str, Any]) -> str:
    """The Markdown file of a run: the paper-shaped table, the per-level table, the details."""
    s = result.get("settings", {})
    parts = [f"# Evaluation of {result.get('model')}",
             f"n={s.get('n')}, temperature={s.get('temperature')}, top_p={s.get('top_p')}, "
             f"max_tokens={s.get('max_tokens')}; cells: accuracy % (pass@1) / mean response tokens",
             paper_table(result)]
    levels = level_table(result)
    if levels:
        parts += ["## Per difficulty level", levels]
    parts += ["## Details", details_table(result)]
    return "\n\n".join(parts) + "\n"


def compare_table(a: Mapping[str, Any], b: Mapping[str, Any], *, label_a: str | None = None,
                  label_b: str | None = None) -> str:
    """Side by side: for each setting the two runs share, a row per run and a delta row (B - A):
    accuracy points / tokens (relative token change). Benchmarks one run lacks show '-'; per-level
    blocks follow for benchmarks with levels in both."""
    label_a, label_b = label_a or model_label(a), label_b or model_label(b)
    if label_a == label_b:
        label_a, label_b = f"A: {label_a}", f"B: {label_b}"
    benchmarks = _benchmarks_of(a, b)
    shared = [s for s in a["results"] if s in b["results"]]
    if not shared:
        raise ValueError(f"the two results share no setting (A: {list(a['results'])}, B: {list(b['results'])})")
    head = "| setting | model | " + " | ".join(benchmark_title(x) for x in benchmarks) + " | Avg |"
    lines = [head, "|---|---|" + "---|" * (len(benchmarks) + 1)]
    blocks = []
    for setting in shared:
        common = [x for x in benchmarks if x in a["results"][setting] and x in b["results"][setting]]
        va = _row_values(a["results"][setting], benchmarks)
        vb = _row_values(b["results"][setting], benchmarks)
        # Avg is compared over the benchmarks both runs have, so that a missing one does not skew it.
        va[-1] = _row_values({x: a["results"][setting][x] for x in common}, common)[-1]
        vb[-1] = _row_values({x: b["results"][setting][x] for x in common}, common)[-1]
        lines.append(f"| {setting} | {label_a} | " + " | ".join(_cell(*v) if v else "-" for v in va) + " |")
        lines.append(f"| {setting} | {label_b} | " + " | ".join(_cell(*v) if v else "-" for v in vb) + " |")
        lines.append(f"| {setting} | delta | " + " | ".join(_delta_cell(x, y) for x, y in zip(va, vb)) + " |")
        for name in common:
            la = a["results"][setting][name].get("levels") or {}
            lb = b["results"][setting][name].get("levels") or {}
            levels = [lv for lv in la if lv in lb]
            if not levels:
                continue
            rows = [f"| {benchmark_title(name)} ({setting}) | " + " | ".join(f"level {lv}" for lv in levels) + " |",
                    "|---|" + "---|" * len(levels)]
            for label, per in ((label_a, la), (label_b, lb)):
                rows.append(f"| {label} | " + " | ".join(_cell(per[lv]["accuracy"], per[lv]["tokens"]["mean"])
                                                          for lv in levels) + " |")
            rows.append("| delta | " + " | ".join(
                _delta_cell((la[lv]["accuracy"], la[lv]["tokens"]["mean"]),
                            (lb[lv]["accuracy"], lb[lv]["tokens"]["mean"]))
                for lv in levels) + " |")
            blocks.append("\n".join(rows))
    text = "\n".join(lines)
    if blocks:
        text += "\n\n" + "\n\n".join(blocks)
    return text + "\n"


def plot_tokens_per_level(result: Mapping[str, Any], path: str | Path) -> bool:
    """PNG: mean response tokens (left) and accuracy (right) per difficulty level, one line per
    (benchmark, setting) with levels. Returns False (and writes nothing) when no benchmark has levels."""
    series = {f"{benchmark_title(b)} {s}": m["levels"] for s, per in result["results"].items()
              for b, m in per.items() if m.get("levels")}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tokens, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in series.items():
        xs = list(levels)
        ax_tokens.plot(xs, [levels[lv]["tokens"]["mean"] for lv in xs], marker="o", label=name)
        ax_acc.plot(xs, [100 * levels[lv]["accuracy"] for lv in xs], marker="o", label=name)
    ax_tokens.set(xlabel="difficulty level", ylabel="mean response tokens",
                  title=f"tokens per level: {model_label(result)}")
    ax_acc.set(xlabel="difficulty level", ylabel="accuracy (%)", title="accuracy per level", ylim=(0, 102))
    ax_tokens.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
