"""Where each training step's prompts come from: a pure function of the step number.

The data cursor is the step: step s takes prompts s * P ... (s + 1) * P - 1 of an endless stream
(P = train.prompts_per_step). For files, the stream is the dataset in a fresh seeded permutation per
epoch (or file order without `data.shuffle`); for the synthetic task, problems drawn from a
generator seeded by (seed, step). A resumed run therefore needs only the step to continue with
exactly the prompts the interrupted run would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from megatron_hbpo.config import Recipe
from megatron_hbpo.data.prompts import DataError, load_prompts
from megatron_hbpo.data.synthetic import make_problem


@dataclass(frozen=True)
class TaskPrompt:
    problem: str
    answer: str
    level: str | None = None


class PromptSource:
    """The global batch of prompts for a step (every rank computes the same list)."""

    def __init__(self, recipe: Recipe, log=print):
        self.recipe = recipe
        self.seed = recipe.train.seed
        data = recipe.data
        self.rows: list[TaskPrompt] = []
        self.skipped = 0
        if data.source == "files":
            if not data.train_files:
                raise DataError("data.train_files is empty: list jsonl/parquet files with problem and answer "
                                "fields (see tools/prepare_data.py), or set data.source=synthetic")
            for path in data.train_files:
                rows, skipped = load_prompts(path, problem_key=data.problem_key, answer_key=data.answer_key,
                                             skip_bad_rows=data.skip_bad_rows)
                self.rows += [TaskPrompt(r.problem, r.answer, r.level) for r in rows]
                self.skipped += skipped
                if skipped:
                    log(f"data: {path}: skipped {skipped} bad rows (data.skip_bad_rows)")

    def batch(self, step: int, count: int) -> list[TaskPrompt]:
        """Prompts step * count ... (step + 1) * count - 1 of the stream (step counts from 0)."""
        if self.recipe.data.source == "synthetic":
            rng = random.Random(f"{self.seed}:train:{step}")
            levels = self.recipe.data.synthetic_levels
            problems = [make_problem(rng, rng.choice(levels)) for _ in range(count)]
            return [TaskPrompt(p.text, p.answer, str(p.level)) for p in problems]
        return [self._row(index) for index in range(step * count, (step + 1) * count)]

    def _row(self, index: int) -> TaskPrompt:
        epoch, offset = divmod(index, len(self.rows))
        return self.rows[self._order(epoch)[offset]]

    def _order(self, epoch: int) -> Sequence[int]:
        if not self.recipe.data.shuffle:
            return range(len(self.rows))
        cached = getattr(self, "_cached_order", None)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._cached_order = (epoch, order)
        return self._cached_order[1]


def synthetic_eval_set(levels: Sequence[int], per_level: int, seed: int) -> list[TaskPrompt]:
    """A fixed held-out set: `per_level` problems of each level (drawn apart from the training stream)."""
    rng = random.Random(f"{seed}:eval")
    return [TaskPrompt(p.text, p.answer, str(p.level)) for level in levels
            for p in (make_problem(rng, level) for _ in range(per_level))]


def file_eval_set(recipe: Recipe) -> list[TaskPrompt]:
    data = recipe.data
    rows = []
    for path in data.eval_files:
        loaded, _ = load_prompts(path, problem_key=data.problem_key, answer_key=data.answer_key,
                                 skip_bad_rows=data.skip_bad_rows)
        rows += [TaskPrompt(r.problem, r.answer, r.level) for r in loaded]
    return rows
