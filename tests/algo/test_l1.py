"""L1-Exact / L1-Max: prompt sentences, target draws and rewards against docs/baselines.md ("L1"),
re-derived with Python floats; the advantage is GRPO's."""

import itertools
import random
import statistics

import pytest
import torch

from megatron_hbpo.algo.advantage import group_normalized_advantage
from megatron_hbpo.algo.l1 import (
    DEFAULT_ALPHA,
    DEFAULT_ALPHA_MAX,
    DEFAULT_DELTA,
    MODE_CODES,
    append_length_instruction,
    l1_reward,
    length_instruction,
    problem_target,
    sample_targets,
)


def reference(L, N, mode, correct, format_ok, alpha=0.0003, alpha_max=0.001, delta=0.5):
    """The L1 formulas, written out on their own."""
    c = 1.0 if (correct and format_ok) else 0.0
    if mode == "exact":
        return c - alpha * abs(N - L)
    if mode == "max":
        return c * min(1.0, max(0.0, alpha_max * (N - L) + delta))
    return c


def _reward(rows, **kw):
    L, N, modes, correct, fmt = zip(*rows)
    return l1_reward(torch.tensor(L, dtype=torch.float64), torch.tensor(N), list(modes), torch.tensor(correct),
                     torch.tensor(fmt), **kw)


WORKED_TABLE = [  # (mode, correct, L, N, R): the worked values in docs/baselines.md
    ("exact", 1, 1000, 1000, 1.0), ("exact", 1, 1500, 1000, 0.85), ("exact", 0, 1500, 1000, -0.15),
    ("exact", 1, 4096, 100, -0.1988), ("max", 1, 400, 1000, 1.0), ("max", 1, 800, 1000, 0.7),
    ("max", 1, 1000, 1000, 0.5), ("max", 1, 1200, 1000, 0.3), ("max", 1, 1600, 1000, 0.0),
    ("max", 0, 800, 1000, 0.0),
]


def test_worked_table():
    got = _reward([(L, N, mode, bool(c), True) for mode, c, L, N, _ in WORKED_TABLE])
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([r for *_, r in WORKED_TABLE], abs=1e-12)


def test_random_samples_match_reference():
    rng = random.Random(3)
    rows = [(rng.randint(1, 4500), rng.randint(100, 4000), rng.choice(["exact", "max", "none"]),
             rng.random() < 0.6, rng.random() < 0.85) for _ in range(3000)]
    for kw in ({}, {"alpha": 1 / 3000, "alpha_max": 1 / 500, "delta": 0.25}):
        got = _reward(rows, **kw)
        want = [reference(*row, **kw) for row in rows]
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_mode_codes_tensor_equals_names():
    rows = [(900, 1000, "max", True, True), (900, 1000, "exact", True, True), (900, 1000, "none", True, True)]
    by_name = _reward(rows)
    by_code = l1_reward(torch.tensor([900.0] * 3), torch.tensor([1000] * 3),
                        torch.tensor([MODE_CODES["max"], MODE_CODES["exact"], MODE_CODES["none"]]),
                        torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    assert by_code.tolist() == pytest.approx(by_name.tolist(), abs=1e-6)
    assert by_name.tolist() == pytest.approx([0.6, 0.97, 1.0], abs=1e-12)


def test_format_errors_and_truncation_score_as_wrong():
    # Correct answer but no </think> (a truncated response at the 4096 cap, or a format error):
    # exact mode keeps its length term, max mode pays 0, no instruction pays 0.
    got = _reward([(4096, 1000, "exact", True, False), (4096, 1000, "max", True, False),
                   (700, 1000, "max", True, False), (500, 500, "exact", True, False), (10, 1, "none", True, False)])
    assert got.tolist() == pytest.approx([-0.0003 * 3096, 0.0, 0.0, 0.0, 0.0], abs=1e-12)


def test_correct_far_from_target_scores_below_wrong_on_target():
    far, wrong_on_target = _reward([(4096, 100, "exact", True, True), (100, 100, "exact", False, True)]).tolist()
    assert far < wrong_on_target == 0.0


def test_max_mode_reward_is_clipped_and_monotone():
    lengths = list(range(0, 3001, 50))
    got = _reward([(L, 1000, "max", True, True) for L in lengths]).tolist()
    assert all(0.0 <= r <= 1.0 for r in got)
    assert all(a >= b for a, b in itertools.pairwise(got))
    assert got[lengths.index(500)] == 1.0 and got[lengths.index(1500)] == 0.0


def test_grpo_advantage_over_l1_groups():
    rng = random.Random(5)
    rewards, groups = [], []
    for g, size in enumerate([16, 16, 4, 1, 3]):
        N, mode = rng.randint(100, 4000), rng.choice(["exact", "max"])  # one (N, mode) per group
        for _ in range(size):
            rewards.append(reference(rng.randint(50, 4096), N, mode, rng.random() < 0.5, rng.random() < 0.9))
            groups.append(g)
    got = group_normalized_advantage(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups))
    want = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        want.append(0.0 if len(members) == 1 else (r - statistics.mean(members)) / (statistics.stdev(members) + 1e-6))
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    assert got[groups.index(3)].item() == 0.0  # a group of one has no signal


def test_all_wrong_max_group_gives_no_signal():
    rewards = _reward([(L, 1000, "max", False, True) for L in (200, 900, 3000, 4096)])
    assert torch.equal(group_normalized_advantage(rewards, torch.zeros(4, dtype=torch.long)), torch.zeros(4).double())


def test_sentences():
    assert length_instruction(1000, "exact") == " Think for 1000 tokens."
    assert length_instruction(512, "max") == " Think for maximum 512 tokens."
    assert length_instruction(512, "none") == ""
    text = "Solve x+1=2. Let's think step by step and output the final answer within \\boxed{}."
    assert append_length_instruction(text, 1024, "max") == text + " Think for maximum 1024 tokens."
    for bad in [(0, "exact"), (5, "exactly"), (True, "max"), (1.5, "max")]:
        with pytest.raises(ValueError):
            length_instruction(*bad)


def test_targets_are_uniform_integers_in_the_closed_range():
    targets, modes = sample_targets(3000, generator=torch.Generator().manual_seed(0), n_min=1, n_max=3)
    assert set(targets) == {1, 2, 3} and set(modes) == {"exact"}
    targets, _ = sample_targets(20000, generator=torch.Generator().manual_seed(1))
    assert min(targets) >= 100 and max(targets) <= 4000
    assert 2000 < statistics.mean(targets) < 2100  # (100 + 4000) / 2 = 2050
    assert all(isinstance(t, int) for t in targets[:10])


def test_max_stage_mixes_modes_and_keeps_n():
    def gen():
        return torch.Generator().manual_seed(7)

    exact_targets, exact_modes = sample_targets(4000, generator=gen(), stage="exact")
    max_targets, max_modes = sample_targets(4000, generator=gen(), stage="max")
    assert exact_targets == max_targets and set(exact_modes) == {"exact"}
    assert 0.46 < max_modes.count("max") / 4000 < 0.54
    _, all_max = sample_targets(100, generator=gen(), stage="max", max_fraction=1.0)
    assert set(all_max) == {"max"}


def test_problem_targets_are_a_function_of_seed_and_problem():
    problems = [f"problem {i}" for i in range(50)]
    first = [problem_target(11, p, stage="max") for p in problems]
    again = [problem_target(11, p, stage="max") for p in reversed(problems)][::-1]
    assert first == again
    assert [problem_target(12, p, stage="max") for p in problems] != first
    assert {m for _, m in first} == {"exact", "max"}
    assert [n for n, _ in first] == [problem_target(11, p)[0] for p in problems]  # same N in both stages


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1-D"):
        l1_reward(torch.ones(3), torch.ones(2), ["exact"] * 3, torch.ones(3, dtype=torch.bool),
                  torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="modes"):
        l1_reward(torch.ones(1), torch.ones(1), ["maximum"], torch.ones(1, dtype=torch.bool),
                  torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="codes"):
        l1_reward(torch.ones(1), torch.ones(1), torch.tensor([5]), torch.ones(1, dtype=torch.bool),
                  torch.ones(1, dtype=torch.bool))
