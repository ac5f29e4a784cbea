"""TLMRE: length-normalised reward among a prompt's correct responses and the RLOO advantage,
against docs/baselines.md ("TLMRE") re-derived with Python floats and `statistics`."""

import itertools
import math
import random
import statistics

import pytest
import torch

from megatron_hbpo.algo.advantage import group_normalized_advantage
from megatron_hbpo.algo.tlmre import (
    rloo_advantage,
    tlmre_reward,
    whiten_advantages,
    whitening_moments,
)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def reference_rewards(lengths, correct, format_ok, groups, alpha, eps=1e-7):
    out = []
    for i in range(len(lengths)):
        if not (correct[i] and format_ok[i]):
            out.append(0.0)
            continue
        solved = [lengths[j] for j in range(len(lengths)) if groups[j] == groups[i] and correct[j] and format_ok[j]]
        mu, sigma = statistics.mean(solved), statistics.pstdev(solved) + eps
        out.append(1 - alpha * sigmoid((lengths[i] - mu) / sigma))
    return out


def reference_rloo(rewards, groups):
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and j != i]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _bools(values):
    return torch.tensor(values, dtype=torch.bool)


WORKED_CORRECT = [1, 1, 1, 0, 1, 0, 1, 1]
WORKED_LENGTHS = [800, 1200, 2000, 4000, 1000, 3000, 1500, 900]


def test_worked_group():
    ones = torch.ones(8, dtype=torch.bool)
    zeros = torch.zeros(8, dtype=torch.long)
    rewards = tlmre_reward(_f64(WORKED_LENGTHS), _bools(WORKED_CORRECT), ones, zeros, alpha=0.4)
    assert rewards.dtype == torch.float64
    assert rewards.tolist() == pytest.approx(
        [0.896651, 0.808107, 0.653623, 0, 0.855300, 0, 0.737296, 0.876938], abs=1e-6)
    assert rloo_advantage(rewards, zeros).tolist() == pytest.approx(
        [0.335041, 0.233848, 0.057296, -0.689702, 0.287783, -0.689702, 0.152922, 0.312513], abs=1e-6)
    solved = [L for L, c in zip(WORKED_LENGTHS, WORKED_CORRECT) if c]
    assert statistics.mean(solved) == pytest.approx(1233.333, abs=1e-3)
    assert statistics.pstdev(solved) == pytest.approx(410.961, abs=1e-3)


def test_random_shuffled_groups_match_reference():
    rng = random.Random(2)
    lengths, correct, fmt, groups = [], [], [], []
    for g, size in enumerate([16, 8, 8, 1, 2, 5, 16]):
        p_correct = [0.0, 1.0, 0.5, 0.7, 0.5, 0.2, 0.6][g]
        for _ in range(size):
            lengths.append(rng.randint(50, 4096))
            correct.append(rng.random() < p_correct)
            fmt.append(rng.random() < 0.9)
            groups.append(1000 - 13 * g)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    lengths, correct, fmt, groups = ([x[i] for i in order] for x in (lengths, correct, fmt, groups))
    for alpha in (0.05, 0.2, 0.4):
        rewards = tlmre_reward(_f64(lengths), _bools(correct), _bools(fmt), torch.tensor(groups), alpha=alpha)
        want = reference_rewards(lengths, correct, fmt, groups, alpha)
        assert rewards.tolist() == pytest.approx(want, abs=1e-12)
        assert rloo_advantage(rewards, torch.tensor(groups)).tolist() == pytest.approx(
            reference_rloo(want, groups), abs=1e-12)


def test_rloo_is_n_over_n_minus_one_times_centered():
    rewards = _f64([0.9, 0.0, 0.7, 0.8])
    n, mean = 4, 0.6
    assert rloo_advantage(rewards, torch.zeros(4, dtype=torch.long)).tolist() == pytest.approx(
        [n / (n - 1) * (r - mean) for r in rewards.tolist()], abs=1e-12)


def test_all_wrong_group_has_no_signal():
    rewards = tlmre_reward(_f64([100, 2000, 4096]), _bools([0, 0, 0]), _bools([1, 1, 0]),
                           torch.zeros(3, dtype=torch.long), alpha=0.4)
    assert torch.equal(rewards, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rloo_advantage(rewards, torch.zeros(3, dtype=torch.long)), torch.zeros(3).double())


def test_one_correct_or_equal_lengths_give_one_minus_half_alpha():
    one = tlmre_reward(_f64([700, 300]), _bools([1, 0]), _bools([1, 1]), torch.zeros(2, dtype=torch.long), alpha=0.4)
    assert one.tolist() == pytest.approx([0.8, 0.0], abs=1e-12)
    equal = tlmre_reward(_f64([900] * 4), _bools([1] * 4), _bools([1] * 4), torch.zeros(4, dtype=torch.long), alpha=0.2)
    assert equal.tolist() == pytest.approx([0.9] * 4, abs=1e-12)
    assert torch.equal(rloo_advantage(equal, torch.zeros(4, dtype=torch.long)), torch.zeros(4).double())


def test_format_errors_and_truncations_are_wrong_and_left_out_of_the_statistics():
    groups = torch.zeros(4, dtype=torch.long)
    # The third response is "correct" but truncated (format error): same rewards as if it were wrong.
    with_error = tlmre_reward(_f64([500, 1500, 4096, 900]), _bools([1, 1, 1, 1]), _bools([1, 1, 0, 1]), groups,
                              alpha=0.4)
    as_wrong = tlmre_reward(_f64([500, 1500, 4096, 900]), _bools([1, 1, 0, 1]), _bools([1, 1, 1, 1]), groups,
                            alpha=0.4)
    assert torch.equal(with_error, as_wrong) and with_error[2].item() == 0.0
    assert with_error.tolist() == pytest.approx(
        reference_rewards([500, 1500, 4096, 900], [1, 1, 0, 1], [1, 1, 1, 1], [0] * 4, 0.4), abs=1e-12)


def test_groups_of_one():
    rewards = tlmre_reward(_f64([800, 1600]), _bools([1, 1]), _bools([1, 1]), torch.tensor([4, 9]), alpha=0.4)
    assert rewards.tolist() == pytest.approx([0.8, 0.8], abs=1e-12)
    assert rloo_advantage(rewards, torch.tensor([4, 9])).tolist() == [0.0, 0.0]


def test_correct_always_beats_wrong_and_shorter_beats_longer():
    lengths = [300, 600, 900, 1200, 4000]
    rewards = tlmre_reward(_f64(lengths), _bools([1, 1, 1, 1, 0]), _bools([1] * 5), torch.zeros(5, dtype=torch.long),
                           alpha=0.99).tolist()
    assert all(a > b for a, b in itertools.pairwise(rewards))
    assert min(rewards[:4]) > 1 - 0.99


def test_no_std_division_keeps_alpha_in_the_advantage():
    # An all-correct group: RLOO advantages scale with alpha, GRPO-normalised ones do not.
    lengths, groups = _f64([500, 900, 1300, 1700]), torch.zeros(4, dtype=torch.long)
    ok = torch.ones(4, dtype=torch.bool)
    small, large = (tlmre_reward(lengths, ok, ok, groups, alpha=a) for a in (0.1, 0.4))
    assert rloo_advantage(large, groups).tolist() == pytest.approx((4 * rloo_advantage(small, groups)).tolist(),
                                                                  abs=1e-12)
    assert group_normalized_advantage(large, groups).tolist() == pytest.approx(
        group_normalized_advantage(small, groups).tolist(), abs=1e-4)


def test_whitening_matches_token_weighted_reference_and_splits_over_ranks():
    rng = random.Random(9)
    adv = [rng.uniform(-1, 1) for _ in range(12)]
    tokens = [rng.randint(1, 300) for _ in range(12)]
    total = sum(tokens)
    mean = sum(a * t for a, t in zip(adv, tokens)) / total
    var = sum(t * (a - mean) ** 2 for a, t in zip(adv, tokens)) / total
    want = [(a - mean) / math.sqrt(var) for a in adv]
    moments = whitening_moments(_f64(adv), torch.tensor(tokens))
    assert whiten_advantages(_f64(adv), moments).tolist() == pytest.approx(want, abs=1e-10)
    # Two "ranks" each add their moments (an all-reduce SUM): the same whitening.
    split = whitening_moments(_f64(adv[:5]), torch.tensor(tokens[:5])) + whitening_moments(
        _f64(adv[5:]), torch.tensor(tokens[5:]))
    assert whiten_advantages(_f64(adv[5:]), split).tolist() == pytest.approx(want[5:], abs=1e-10)
    float32 = whiten_advantages(torch.tensor(adv), moments)
    assert float32.dtype == torch.float32


def test_whitening_constant_advantages_and_empty_batch():
    moments = whitening_moments(_f64([0.5, 0.5]), torch.tensor([10, 20]))
    assert whiten_advantages(_f64([0.5, 0.5]), moments).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="no response tokens"):
        whiten_advantages(_f64([0.5]), whitening_moments(_f64([0.5]), torch.tensor([0])))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1-D"):
        tlmre_reward(torch.ones(3), torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool),
                     torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="floating"):
        rloo_advantage(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
