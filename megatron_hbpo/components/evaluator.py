"""Evaluation during training: the base before the first step, the policy every `eval.interval` steps
and after the last, through the evaluation stack's harness (evaluation/harness.py).

Each DP rank's engine evaluates a slice of the problems; the records are gathered and every rank
builds the same results document (the schema of evaluation/metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_hbpo import atomic
from megatron_hbpo.config import EvalConfig
from megatron_hbpo.data.chat import PromptBuilder
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.evaluation.anytime import KIND, anytime_metrics, anytime_table, generate_and_score_anytime
from megatron_hbpo.evaluation.harness import generate_and_score
from megatron_hbpo.evaluation.metrics import results_document
from megatron_hbpo.evaluation.tables import level_table, results_table
from megatron_hbpo.rollout.engine import RolloutEngine, SamplingSettings
from megatron_hbpo.rollout.layout import RolloutLayout
from megatron_hbpo.seeding import seed_everything

if TYPE_CHECKING:
    from megatron_hbpo.algo.verify import AnswerVerifier


@dataclass
class Evaluator:
    """engine: on every rank; verifier: on each rollout replica's first rank (None elsewhere). Each replica
    evaluates every `replicas`-th problem; its first rank scores them."""

    cfg: EvalConfig
    problems: Sequence[PromptRow]
    modes: Sequence[str]
    benchmark: str
    max_tokens: int
    prompts: PromptBuilder
    engine: RolloutEngine
    verifier: AnswerVerifier | None
    think_close: str
    run_dir: Path
    layout: RolloutLayout
    log: Callable[[str], None] = print
    # The anytime method's acc(b) at these budgets (evaluation/anytime.py), None for the other methods.
    anytime_budgets: list[int] | None = None
    summary_max_tokens: int = 0

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.replica = self.layout.replica_of(dist.get_rank())

    def should_evaluate(self, step: int) -> bool:
        return bool(self.cfg.interval) and step % self.cfg.interval == 0

    def evaluate(self, label: str) -> dict[str, Any]:
        """Collective. The results document of the current engine weights; rank 0 writes the samples file."""
        start = time.perf_counter()
        mine = list(self.problems)[self.replica::self.layout.replicas]
        seed_everything(self.cfg.seed, "eval", label, self.replica)
        sampling = SamplingSettings(temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.max_tokens)
        # The engine stays awake: the next rollouts use it before any training step.
        self.engine.wake()
        records = generate_and_score(self.engine, self.prompts, self.verifier, mine, benchmark=self.benchmark,
                                     modes=self.modes, n=self.cfg.samples_per_problem, sampling=sampling,
                                     think_close=self.think_close) if self.modes else []
        anytime_samples = generate_and_score_anytime(
            self.engine, self.prompts, self.verifier, mine, budgets=self.anytime_budgets,
            n=self.cfg.samples_per_problem, sampling=sampling, summary_max_tokens=self.summary_max_tokens) \
            if self.anytime_budgets else []
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (records, anytime_samples))
        all_records = [r for part in gathered for r in part[0]]
        result = results_document(all_records, label=label, soft_margin=self.cfg.adherence_soft_margin,
                                  settings={"n": self.cfg.samples_per_problem, "temperature": self.cfg.temperature,
                                            "top_p": self.cfg.top_p, "max_tokens": self.max_tokens,
                                            "seed": self.cfg.seed})
        if self.anytime_budgets:
            result[KIND] = {self.benchmark: anytime_metrics([x for part in gathered for x in part[1]],
                                                            self.anytime_budgets)}
        if dist.get_rank() == 0 and all_records:
            atomic.write_jsonl(self.run_dir / f"eval_samples_{label.replace(' ', '_')}.jsonl",
                               (r.to_json() for r in _first_per_group(all_records)))
        tables = (level_table(result) or results_table(result)) if all_records else ""
        if self.anytime_budgets:
            tables += "acc(b) %, a forced summary after b thinking tokens:\n" + anytime_table({label: result})
        self.log(f"evaluation {label} ({time.perf_counter() - start:.1f} s; accuracy % / mean response tokens):\n"
                 + tables)
        return result

    @staticmethod
    def step_metrics(result: dict[str, Any]) -> dict[str, float]:
        """Flat metrics of a results document for the step's metrics line: eval_<mode>_<level>/<name>."""
        out = {}
        for mode, per_benchmark in result["results"].items():
            for metrics in per_benchmark.values():
                for level, m in {**metrics["levels"], "all": metrics["all"]}.items():
                    out.update({f"eval_{mode}_{level}/accuracy": m["accuracy"],
                                f"eval_{mode}_{level}/mean_tokens": m["tokens"]["mean"],
                                f"eval_{mode}_{level}/truncation_rate": m["truncation_rate"]})
        for m in result.get(KIND, {}).values():  # the training task's one benchmark
            out.update({f"eval_anytime/acc_b{b}": v for b, v in m["acc"].items()})
            out.update({"eval_anytime/anytime_accuracy": m["anytime_accuracy"],
                        "eval_anytime/final_accuracy": m["final_accuracy"]})
        return out


def _first_per_group(records: Sequence[Any], per_group: int = 4) -> list[Any]:
    """The first `per_group` responses of each (mode, level): what the numbers look like as text."""
    seen: dict[tuple[str, str | None], int] = {}
    out = []
    for r in records:
        key = (r.setting, r.level)
        if seen.get(key, 0) < per_group:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out
