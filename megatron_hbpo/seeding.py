"""Reproducible random draws: every random stream of a step is seeded from (seed, step, rank, ...).

A resumed run re-seeds at the start of each step, so it needs the step, not a snapshot of generator
states (which vLLM's start-up would disturb anyway).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derived_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from (seed, parts) through SHA-256: every part changes every bit. (torch's CPU
    generator keeps only the low 32 bits of its seed, so a seed built from the raw bytes of the text
    would let the leading characters decide alone: steps and replicas would share one stream.)"""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def seed_everything(seed: int, *parts: Any) -> None:
    """Seed python, numpy and torch from (seed, parts): the same parts give the same draws, different
    parts independent ones. vLLM's CPU sampling uses the global torch generator, so this seeds
    rollouts too."""
    value = derived_seed(seed, *parts)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
