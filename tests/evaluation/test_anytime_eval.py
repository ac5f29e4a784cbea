"""Anytime evaluation (docs/anytime.md, "Evaluation") with a scripted engine: the thinking is cut at every
budget of the grid, one summary is forced after the inserts, and acc(b), the anytime accuracy and the final
accuracy follow from which cuts the script answers correctly; tools/evaluate.py's anytime comparison."""

from __future__ import annotations

import json

import torch

from helpers import load_tool
from megatron_hbpo.algo import anytime
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.data.synthetic import task_tokenizer
from megatron_hbpo.evaluation.anytime import anytime_metrics, generate_and_score_anytime
from megatron_hbpo.rollout.engine import Sample, SamplingSettings

BUDGETS = [4, 8, 12, 16]


class ScriptedAnytimeEngine:
    """Thinking: problem 0 writes 12 tokens ending in `</think>`, problem 1 runs to the largest budget
    (cut off). A summary answers right ("\\boxed{<gold>}") when its thinking prefix has >= 8 tokens."""

    def __init__(self, tok, prompt_lengths):
        self.tok, self.prompt_lengths, self.calls = tok, prompt_lengths, []

    def generate(self, requests):
        tok = self.tok
        word, end, eos = tok.convert_tokens_to_ids(" check"), anytime.think_end_token_id(tok), tok.eos_token_id
        truncation, final = anytime.summary_insert_ids(tok)
        samples = []
        for r in requests:
            self.calls.append(r)
            if r.sampling.stop_token_ids:  # phase 1
                ids = [word] * 11 + [end] if r.group_id == 0 else [word] * r.sampling.max_tokens
                finish = "stop" if r.group_id == 0 else "length"
            else:
                truncated = r.prompt_ids[-len(truncation) - len(final):-len(final)] == truncation
                cut = len(r.prompt_ids) - self.prompt_lengths[r.group_id] - len(final) - len(truncation) * truncated
                digit = "7" if cut >= 8 else "3"
                ids, finish = tok.encode(f"\\boxed{{{digit}}}", add_special_tokens=False) + [eos], "stop"
            samples += [Sample(prompt_ids=list(r.prompt_ids), response_ids=list(ids), logprobs=torch.zeros(len(ids)),
                               finish_reason=finish, budget=None, group_id=r.group_id) for _ in range(r.n)]
        return samples


class ExactVerifier:
    def check(self, golds, answers):
        return [(g == a, "ok") for g, a in zip(golds, answers)]


def test_acc_of_b_from_forced_summaries():
    tok = task_tokenizer(summary_markers=True)
    prompts = PromptBuilder(tok, PromptFormat(template="{problem}", think_open="<think>"))
    problems = [PromptRow(problem="last digit of a3+b4", answer="7", level="1"),
                PromptRow(problem="last digit of a5+b2", answer="7", level="1")]
    lengths = [len(x) for x in prompts.many([(p.problem, "natural") for p in problems])]
    engine = ScriptedAnytimeEngine(tok, lengths)
    samples = generate_and_score_anytime(engine, prompts, ExactVerifier(), problems, budgets=BUDGETS, n=2,
                                         sampling=SamplingSettings(temperature=0.6), summary_max_tokens=6)
    assert [s.ending for s in samples] == ["ended", "ended", "cut_off", "cut_off"]
    assert samples[0].cuts == [4, 8, 12, 12] and samples[2].cuts == BUDGETS
    # Phase 2 asked once per distinct cut, one summary per budget: problem 0's cut 12 serves two budgets.
    summary_requests = [r for r in engine.calls if not r.sampling.stop_token_ids]
    assert [r.n for r in summary_requests if r.group_id == 0] == [1, 1, 2] * 2
    assert all(r.sampling.max_tokens == 6 and r.sampling.temperature == 0.6 for r in summary_requests)
    m = anytime_metrics(samples, BUDGETS)
    assert m["acc"] == {"4": 0.0, "8": 1.0, "12": 1.0, "16": 1.0}
    assert m["anytime_accuracy"] == 0.75 and m["final_accuracy"] == 1.0
    assert m["thinking_tokens"]["16"] == (12 + 16) / 2 and m["endings"]["cut_off"] == 2
    assert m["format_rate"] == {str(b): 1.0 for b in BUDGETS}


def test_compare_draws_one_curve_per_model(tmp_path):
    tool = load_tool()
    for name, acc in (("grpo", [0.1, 0.5, 0.8]), ("anytime", [0.4, 0.7, 0.8])):
        m = {"budgets": [1, 2, 3], "acc": {str(b): a for b, a in zip([1, 2, 3], acc)},
             "anytime_accuracy": sum(acc) / 3, "final_accuracy": acc[-1]}
        (tmp_path / f"{name}.json").write_text(json.dumps({"label": name, "anytime": {"synthetic": m}}))
    assert tool.main(["--compare", str(tmp_path / "grpo.json"), str(tmp_path / "anytime.json"),
                      "--out", str(tmp_path)]) == 0
    assert (tmp_path / "anytime_compare.png").stat().st_size > 0
