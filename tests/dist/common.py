"""What the torchrun test scripts share: building a policy from a test recipe and reporting results as
JSON for pytest (conftest.run_torchrun reads one file per rank)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def policy_from_recipe(recipe: Any, hf_config: Any, *, tree_rows: bool | None = None) -> Any:
    """A MegatronPolicy with a recipe's sections, as train.py builds it (tree_rows: the recipe's unless given)."""
    from megatron_hbpo.megatron.train_step import MegatronPolicy

    t = recipe.train
    return MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer,
                          micro_batch_tokens=t.micro_batch_tokens,
                          optimizer_steps=t.total_steps * (t.prompts_per_step // t.mini_batch_prompts),
                          tree_rows=recipe.tree_rows if tree_rows is None else tree_rows)


def write_report(report: dict) -> None:
    """This rank's results, for the test to assert on: $TEST_REPORT_DIR/rank<r>.json."""
    directory = os.environ.get("TEST_REPORT_DIR")
    if not directory:
        return
    rank = int(os.environ.get("RANK", "0"))
    Path(directory, f"rank{rank}.json").write_text(json.dumps(report, indent=1, default=float))
