"""Reproducible random draws: every random stream of a step is seeded from (seed, step, rank, ...).

A resumed run re-seeds at the start of each step, so it needs the step, not a snapshot of generator
states (which vLLM's start-up would disturb anyway).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, *parts: Any) -> None:
    """Seed python, numpy and torch from (seed, parts): the same parts give the same draws. vLLM's CPU
    sampling uses the global torch generator, so this seeds rollouts too."""
    value = int.from_bytes(repr((seed, *parts)).encode(), "little") % (2**63 - 1)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
