"""Anytime evaluation (docs/anytime.md, "Evaluation"): acc(b) on a budget grid for any model.

For each question, K thinking samples (stopping at `</think>` or EOS, at most the largest budget);
at every budget b the thinking is cut at min(b, L) and one summary is forced exactly as in training
(the inserts appended as ids) and scored like a training summary. acc(b) is the mean score over
questions and samples; the anytime accuracy is the plain mean of acc(b) over the grid and the final
accuracy acc(b_max). The same path serves tools/evaluate.py (`--setting anytime[:B1,...]`, any model
whose tokenizer has `</think>` as one token: an HBPO-trained model too) and the trainer's evaluation of
the anytime method (components/evaluator.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_hbpo.algo import anytime
from megatron_hbpo.data.chat import NATURAL, PromptBuilder
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.rollout.engine import Request, RolloutEngine, SamplingSettings

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier

KIND = "anytime"


@dataclass
class AnytimeSample:
    """One thinking sample's scores at every budget of the grid."""

    problem: int
    level: str | None
    length: int  # thinking tokens L
    ending: str
    rewards: list[float]  # per budget
    format_ok: list[bool]
    cuts: list[int]


def generate_and_score_anytime(engine: RolloutEngine, prompts: PromptBuilder, verifier: AnswerVerifier | None,
                               problems: Sequence[PromptRow], *, budgets: Sequence[int], n: int,
                               sampling: SamplingSettings, summary_max_tokens: int) -> list[AnytimeSample]:
    """K = n thinking samples per problem, one forced summary per budget, scored; [] without a verifier (the
    other ranks of a rollout replica generate alongside its first rank). Two engine calls, in order."""
    from megatron_hbpo.algo.methods import plan_summaries
    from megatron_hbpo.components.anytime_rollouts import score_summaries

    tokenizer = prompts.tokenizer
    think_end = anytime.think_end_token_id(tokenizer)
    if think_end is None:
        raise ValueError("anytime evaluation needs a tokenizer with `</think>` as one token (to stop the thinking)")
    eos = int(tokenizer.eos_token_id)
    truncation, final = anytime.summary_insert_ids(tokenizer)
    budgets = sorted(int(b) for b in budgets)
    thinking_sampling = SamplingSettings(temperature=sampling.temperature, top_p=sampling.top_p,
                                         max_tokens=budgets[-1], stop_token_ids=(think_end,))
    summary_sampling = SamplingSettings(temperature=sampling.temperature, top_p=sampling.top_p,
                                        max_tokens=summary_max_tokens)
    ids = prompts.many([(p.problem, NATURAL) for p in problems])
    thinking = engine.generate([Request(prompt_ids=x, n=n, budget=None, sampling=thinking_sampling, group_id=i)
                                for i, x in enumerate(ids)])
    plans = [plan_summaries(s.prompt_ids, s.response_ids, budgets=budgets, thinking_budget=budgets[-1], n_summaries=1,
                            group_id=s.group_id, sampling=summary_sampling, think_end_id=think_end, eos_id=eos,
                            truncation_ids=truncation, final_answer_ids=final) for s in thinking]
    summaries = engine.generate([q for plan in plans for q in plan.requests])
    if verifier is None:
        return []
    drawn = iter(summaries)
    flat = []  # (sample index, budget index, inserted ids, summary ids, prefix ends with EOS)
    for index, (sample, plan) in enumerate(zip(thinking, plans)):
        for request, shared, n_inserted in zip(plan.requests, plan.slots, plan.inserted):
            cut = plan.cuts[shared[0]]
            for slot in shared:
                flat.append((index, slot, request.prompt_ids[len(request.prompt_ids) - n_inserted:],
                             next(drawn).response_ids, sample.response_ids[cut - 1] == eos))
    rewards, formats, _ = score_summaries(
        tokenizer, verifier, inserted=[f[2] for f in flat], summaries=[f[3] for f in flat],
        prefix_ends_with_eos=[f[4] for f in flat], golds=[problems[thinking[f[0]].group_id].answer for f in flat],
        think_end_id=think_end, eos_id=eos)
    out = [AnytimeSample(problem=s.group_id, level=problems[s.group_id].level, length=len(s.response_ids),
                         ending=plan.ending, rewards=[0.0] * len(budgets), format_ok=[False] * len(budgets),
                         cuts=list(plan.cuts)) for s, plan in zip(thinking, plans)]
    for (index, slot, *_), reward, ok in zip(flat, rewards, formats):
        out[index].rewards[slot] = reward
        out[index].format_ok[slot] = ok
    return out


def anytime_metrics(samples: Sequence[AnytimeSample], budgets: Sequence[int]) -> dict[str, Any]:
    """acc(b), format rate and mean thinking tokens seen at each budget, the anytime and final accuracy, and
    acc(b) per level; budgets are keys as strings (JSON)."""
    budgets = sorted(int(b) for b in budgets)
    if not samples:
        raise ValueError("anytime evaluation scored no samples")

    def per_budget(rows: Sequence[AnytimeSample]) -> dict[str, float]:
        return {str(b): statistics.fmean(r.rewards[j] for r in rows) for j, b in enumerate(budgets)}

    acc = per_budget(samples)
    levels = sorted({s.level for s in samples if s.level is not None}, key=str)
    return {
        "budgets": budgets,
        "samples": len(samples),
        "problems": len({s.problem for s in samples}),
        "acc": acc,
        "format_rate": {str(b): statistics.fmean(float(r.format_ok[j]) for r in samples)
                        for j, b in enumerate(budgets)},
        "thinking_tokens": {str(b): statistics.fmean(r.cuts[j] for r in samples) for j, b in enumerate(budgets)},
        "anytime_accuracy": anytime.anytime_accuracy(list(acc.values())),
        "final_accuracy": acc[str(budgets[-1])],
        "mean_thinking_tokens": statistics.fmean(s.length for s in samples),
        "endings": {e: sum(s.ending == e for s in samples) for e in anytime.ENDINGS},
        "levels": {str(lv): per_budget([s for s in samples if s.level == lv]) for lv in levels},
    }


def is_anytime_document(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get(KIND), dict)


def anytime_table(docs: dict[str, dict], *, every: int = 1) -> str:
    """Markdown: one row per (model, benchmark): anytime and final accuracy %, then acc(b) % at every
    `every`-th budget of the grid. docs: label -> document with an "anytime" section {benchmark: metrics}."""
    lines: list[str] = []
    for label, doc in docs.items():
        for benchmark, m in doc[KIND].items():
            shown = m["budgets"][every - 1::every]
            if not lines:
                head = " | ".join(f"b={b}" for b in shown)
                lines.append(f"| model | benchmark | anytime acc | final acc | {head} |")
                lines.append("|---" * (4 + len(shown)) + "|")
            cells = " | ".join(f"{100 * m['acc'][str(b)]:.1f}" for b in shown)
            lines.append(f"| {label} | {benchmark} | {100 * m['anytime_accuracy']:.1f} | "
                         f"{100 * m['final_accuracy']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_anytime(docs: dict[str, dict], path: Path) -> bool:
    """acc(b) curves, one line per model (and benchmark), into `path`; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{label} ({benchmark})" if len(doc[KIND]) > 1 else label, m) for label, doc in docs.items()
              for benchmark, m in doc[KIND].items()]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in series:
        ax.plot(m["budgets"], [100 * m["acc"][str(b)] for b in m["budgets"]], marker="o", markersize=3,
                label=f"{name}: anytime {100 * m['anytime_accuracy']:.1f}, final {100 * m['final_accuracy']:.1f}")
    save_acc_plot(fig, ax, "Anytime accuracy: forced summary after b thinking tokens", path)
    return True


def save_acc_plot(fig: Any, ax: Any, title: str, path: Path) -> None:
    """Label an acc(b) plot's axes, write it to `path` and close it (the evaluation's and the seed
    comparison's plots look alike)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("thinking budget b (tokens)")
    ax.set_ylabel("acc(b) %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
