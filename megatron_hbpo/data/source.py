"""Where each training step's prompts come from: a pure function of the step number.

The data cursor is the step: step s takes prompts s * P ... (s + 1) * P - 1 of an endless stream
(P = train.prompts_per_step). For files, the stream is the dataset in a fresh seeded permutation per
epoch (or file order without `data.shuffle`); for the synthetic task, problems drawn from a
generator seeded by (seed, step). A resumed run therefore needs only the step to continue with
exactly the prompts the interrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from megatron_hbpo.config import DataConfig
from megatron_hbpo.data.prompts import DataError, PromptRow, load_prompts
from megatron_hbpo.data.synthetic import make_problem


def load_rows(data: DataConfig, files: Sequence[str], log: Callable[[str], None] = print
              ) -> tuple[list[PromptRow], int]:
    """(rows of `files` in the recipe's schema, bad rows skipped); without data.skip_bad_rows a bad row
    raises DataError naming file:line."""
    rows: list[PromptRow] = []
    total_skipped = 0
    for path in files:
        loaded, skipped = load_prompts(path, problem_key=data.problem_key, answer_key=data.answer_key,
                                       skip_bad_rows=data.skip_bad_rows)
        rows += loaded
        total_skipped += skipped
        if skipped:
            log(f"data: {path}: skipped {skipped} bad rows (data.skip_bad_rows)")
    return rows, total_skipped


class PromptSource:
    """The global batch of prompts for a step (every rank computes the same list)."""

    def __init__(self, data: DataConfig, seed: int, log: Callable[[str], None] = print):
        self.data = data
        self.seed = seed
        self.rows: list[PromptRow] = []
        self.skipped = 0
        self._cached_order: tuple[int, list[int]] | None = None
        if data.source == "files":
            if not data.train_files:
                raise DataError("data.train_files is empty: list jsonl/parquet files with problem and answer "
                                "fields (see tools/prepare_data.py), or set data.source=synthetic")
            self.rows, self.skipped = load_rows(data, data.train_files, log)

    def batch(self, step: int, count: int) -> list[PromptRow]:
        """Prompts step * count ... (step + 1) * count - 1 of the stream (step counts from 0)."""
        if self.data.source == "synthetic":
            rng = random.Random(f"{self.seed}:train:{step}")
            problems = [make_problem(rng, rng.choice(self.data.synthetic_levels)) for _ in range(count)]
            return [PromptRow(p.text, p.answer, str(p.level)) for p in problems]
        return [self._row(index) for index in range(step * count, (step + 1) * count)]

    def _row(self, index: int) -> PromptRow:
        epoch, offset = divmod(index, len(self.rows))
        return self.rows[self._order(epoch)[offset]]

    def _order(self, epoch: int) -> Sequence[int]:
        if not self.data.shuffle:
            return range(len(self.rows))
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._cached_order = (epoch, order)
        return self._cached_order[1]


def synthetic_problems(levels: Sequence[int], problems_per_level: int, stream: str) -> list[PromptRow]:
    """`problems_per_level` synthetic problems of each level, from the generator seeded by `stream`."""
    rng = random.Random(stream)
    return [PromptRow(p.text, p.answer, str(p.level)) for level in levels
            for p in (make_problem(rng, level) for _ in range(problems_per_level))]


def eval_set(data: DataConfig, problems_per_level: int, seed: int) -> list[PromptRow]:
    """The held-out problems of in-training evaluation: `problems_per_level` of each synthetic level
    (drawn apart from the training stream), or the rows of data.eval_files."""
    if data.source == "synthetic":
        return synthetic_problems(data.synthetic_levels, problems_per_level, f"{seed}:eval")
    return load_rows(data, data.eval_files)[0]
