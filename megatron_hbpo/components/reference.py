"""The method's measurement of the base model before training (Method.reference): AdaptThink's R_ref.

R_ref(x) is the initial model's accuracy on problem x over K Thinking-mode samples (docs/baselines.md,
"AdaptThink"): each response starts with the forced Thinking token, is sampled like the Thinking
rollouts (rollout temperature and top_p, cap rollout.max_response_length) and is scored with
AdaptThink's accuracy rule. It runs through the evaluation harness (evaluation/harness.py), each
rollout replica (rollout/layout.py) sampling a slice of the problems, while the engine still holds
the base weights. The table goes to `<logging.dir>/adaptthink_reference.json` with the settings it was
measured with, and a resumed run (or a rerun into the same directory) reads it back instead of
measuring again.

Keys: the problem's text (R_ref per training problem, data.train_files) or its level (R_ref per
difficulty level, estimated on `problems_per_level` fixed problems of each level: the synthetic
task, whose training problems are an endless stream; docs/baselines.md explains the choice).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_hbpo import atomic
from megatron_hbpo.algo.adaptthink import adaptthink_accuracy, reference_accuracy, reference_key, think_tag_counts
from megatron_hbpo.config import DataConfig
from megatron_hbpo.data.chat import NATURAL, PromptBuilder
from megatron_hbpo.data.prompts import PromptRow
from megatron_hbpo.data.source import synthetic_problems
from megatron_hbpo.evaluation.harness import generate_and_score
from megatron_hbpo.rollout.engine import RolloutEngine, SamplingSettings
from megatron_hbpo.rollout.layout import RolloutLayout
from megatron_hbpo.seeding import seed_everything

if TYPE_CHECKING:
    from megatron_hbpo.algo.methods import ReferenceSpec
    from megatron_hbpo.algo.verify import AnswerVerifier

REFERENCE_FILE = "adaptthink_reference.json"


def reference_problems(spec: ReferenceSpec, data: DataConfig, train_rows: Sequence[PromptRow], seed: int
                       ) -> list[PromptRow]:
    """The problems R_ref is measured on: every distinct training problem ("problem"), or
    `problems_per_level` of each level ("level": generated apart from the training stream for the
    synthetic task, the first ones of each level in the training files otherwise)."""
    if data.source == "synthetic":
        return synthetic_problems(data.synthetic_levels, spec.problems_per_level, f"{seed}:reference")
    distinct = list({row.problem: row for row in train_rows}.values())
    if spec.keyed_by == "problem":
        return distinct
    by_level: dict[str, list[PromptRow]] = {}
    for row in distinct:
        key = reference_key(row.problem, row.level, "level")
        if len(by_level.setdefault(key, [])) < spec.problems_per_level:
            by_level[key].append(row)
    return [row for rows in by_level.values() for row in rows]


@dataclass
class ReferencePass:
    """engine: on every rank; verifier: on the first rank of each rollout replica (None elsewhere)."""

    spec: ReferenceSpec
    problems: Sequence[PromptRow]
    sampling: SamplingSettings
    prompts: PromptBuilder
    engine: RolloutEngine
    verifier: AnswerVerifier | None
    think_open: str
    think_close: str
    run_dir: Path
    seed: int
    layout: RolloutLayout
    log: Callable[[str], None] = print

    def settings(self) -> dict:
        """What the table depends on; a stored table with other settings is not reused."""
        return {"samples": self.spec.samples, "keyed_by": self.spec.keyed_by, "forced_token": self.spec.forced_token,
                "temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                "max_tokens": self.sampling.max_tokens, "seed": self.seed, "problems": len(self.problems)}

    def table(self) -> dict[str, float]:
        """Collective. The R_ref table: read back from the run directory, or measured and written there."""
        path = Path(self.run_dir) / REFERENCE_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("settings") == self.settings():
                self.log(f"R_ref: reusing {path} ({len(stored['table'])} entries)")
                return stored["table"]
            raise FileExistsError(f"{path} holds R_ref measured with other settings ({stored.get('settings')}); "
                                  "delete it or set logging.dir to another directory")
        start = time.perf_counter()
        keys: list[str] = []
        accuracy: list[bool] = []
        # Every rank of a replica generates (vLLM's TP group); its first rank scores (the others get []).
        replica = self.layout.replica_of(dist.get_rank())
        mine = list(self.problems[replica::self.layout.replicas])
        seed_everything(self.seed, "reference", replica)
        self.engine.wake()
        records = generate_and_score(self.engine, self.prompts, self.verifier, mine, benchmark="reference",
                                     modes=[NATURAL], n=self.spec.samples, sampling=self.sampling,
                                     think_close=self.think_close, forced_first=self.spec.forced_token)
        self.engine.sleep()
        if records:
            tags = [think_tag_counts(r.response, think_open=self.think_open, think_close=self.think_close,
                                     forced_text=self.spec.forced_token) for r in records]
            # A correct record has an answer after `</think>` and is not truncated: correct and well formed.
            correct = torch.tensor([r.correct for r in records], dtype=torch.bool)
            accuracy = adaptthink_accuracy(correct, correct, torch.tensor([t[0] for t in tags], dtype=torch.long),
                                           torch.tensor([t[1] for t in tags], dtype=torch.long)).tolist()
            keys = [reference_key(mine[r.problem_index].problem, r.level, self.spec.keyed_by) for r in records]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (keys, accuracy))
        all_keys = [k for part_keys, _ in gathered for k in part_keys]
        all_accuracy = [a for _, part_accuracy in gathered for a in part_accuracy]
        per_problem = self.spec.samples if self.spec.keyed_by == "problem" else None
        table = {str(k): v for k, v in reference_accuracy(all_keys, all_accuracy,
                                                          samples_per_problem=per_problem).items()}
        if dist.get_rank() == 0:
            atomic.write_json(path, {"settings": self.settings(), "table": table,
                                     "seconds": time.perf_counter() - start})
        dist.barrier()
        shown = ", ".join(f"{k} {v:.3f}" for k, v in list(table.items())[:8])
        self.log(f"R_ref: {len(table)} entries from {len(all_keys)} Thinking-mode samples of the base "
                 f"({time.perf_counter() - start:.1f} s): {shown}{' ...' if len(table) > 8 else ''}")
        return table
