"""hbpo_reward / binary_reward against docs/method.md, re-derived in plain Python floats."""

import math
import random

import pytest
import torch

from megatron_hbpo.algo.reward import binary_reward, budget_baseline, hbpo_reward


def reference_reward(L, b, correct, format_ok, l_max=4096, alpha=1 / 4096, beta=4.0, fmt=0.0):
    """The spec's equations, written out independently of the implementation."""
    if not format_ok:
        return fmt
    if not correct or L > l_max:
        return 0.0
    f2 = beta * math.cos(math.pi * b / (2 * l_max))
    f1 = beta * math.cos(math.pi * L / (2 * l_max)) - alpha * abs(L - b)
    return min(f1, f2)


def _reward(lengths, budgets, correct, format_ok, **kw):
    return hbpo_reward(torch.tensor(lengths, dtype=torch.float64), torch.tensor(budgets, dtype=torch.float64),
                       torch.tensor(correct), torch.tensor(format_ok), **kw)


def test_matches_float64_reference_on_random_samples():
    rng = random.Random(0)
    rows = []
    for _ in range(2000):
        b = rng.choice([512, 1024, 2048, 2560])
        rows.append((rng.randint(1, 4500), b, rng.random() < 0.7, rng.random() < 0.9))
    lengths, budgets, correct, fmt = map(list, zip(*rows))
    got = _reward(lengths, budgets, correct, fmt, format_error_reward=-1.0)
    want = [reference_reward(*row, fmt=-1.0) for row in rows]
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_length_equal_to_budget_earns_the_budget_baseline():
    # f1(b, b) = beta cos(pi b / 2 L_max) = f2(b): 4 cos(pi / 8) and 4 cos(pi / 4) by hand.
    got = _reward([1024, 2048], [1024, 2048], [True, True], [True, True])
    assert got.tolist() == pytest.approx([3.695518130045147, 2.8284271247461903], abs=1e-12)


def test_min_form_differs_from_piecewise_for_small_budget_and_short_answer():
    # b = 512, L = 100: f1 = 4 cos(100 pi / 8192) - 412 / 4096 < f2 = 4 cos(pi / 16).
    f1 = 4 * math.cos(100 * math.pi / 8192) - 412 / 4096
    f2 = 4 * math.cos(math.pi / 16)
    assert f1 < f2  # the region where min(f1, f2) != the paper's "f2 when L <= b"
    got = _reward([100], [512], [True], [True])
    assert got.item() == pytest.approx(f1, abs=1e-12)
    assert got.item() == pytest.approx(3.8964731, abs=1e-6)


def test_short_answer_above_the_crossover_earns_f2():
    # b = 512, L = 400: f1 = 4 cos(400 pi / 8192) - 112 / 4096 > f2, so R = f2 (piecewise and min agree).
    assert 4 * math.cos(400 * math.pi / 8192) - 112 / 4096 > 4 * math.cos(math.pi / 16)
    got = _reward([400], [512], [True], [True])
    assert got.item() == pytest.approx(4 * math.cos(math.pi / 16), abs=1e-12)


def test_the_crossover_is_near_321_tokens_for_budget_512():
    lengths = torch.arange(1, 513, dtype=torch.float64)
    got = hbpo_reward(lengths, torch.full_like(lengths, 512.0), torch.ones(512, dtype=torch.bool),
                      torch.ones(512, dtype=torch.bool))
    below = (got < budget_baseline(torch.tensor(512.0, dtype=torch.float64)) - 1e-12).nonzero().max().item() + 1
    assert 315 <= below <= 325  # docs/method.md: b = 512, L below about 321


def test_longer_than_budget_is_penalised_by_f1():
    got = _reward([3000], [1024], [True], [True])
    assert got.item() == pytest.approx(4 * math.cos(3000 * math.pi / 8192) - 1976 / 4096, abs=1e-12)


def test_length_limit_and_failures():
    got = _reward([4096, 4097, 500, 500, 500], [512, 512, 512, 512, 512],
                  [True, True, False, True, False], [True, True, True, False, False], format_error_reward=-1.0)
    # L = L_max is still allowed: cos(pi/2) = 0 minus the distance penalty.
    assert got[0].item() == pytest.approx(-(4096 - 512) / 4096, abs=1e-12)
    assert got[1].item() == 0.0  # correct but over L_max
    assert got[2].item() == 0.0  # wrong
    assert got[3].item() == -1.0  # format error wins over a correct flag
    assert got[4].item() == -1.0


def test_dtypes():
    f32 = hbpo_reward(torch.tensor([100.0]), torch.tensor([512.0]), torch.tensor([True]), torch.tensor([True]))
    assert f32.dtype == torch.float32
    ints = hbpo_reward(torch.tensor([100]), torch.tensor([512]), torch.tensor([True]), torch.tensor([True]))
    assert ints.dtype == torch.get_default_dtype()
    mixed = hbpo_reward(torch.tensor([100]), torch.tensor([512.0], dtype=torch.float64), torch.tensor([True]),
                        torch.tensor([True]))
    assert mixed.dtype == torch.float64


def test_custom_constants():
    got = _reward([200], [256], [True], [True], l_max=1000, alpha=0.01, beta=2.0)
    want = min(2 * math.cos(math.pi * 200 / 2000) - 0.01 * 56, 2 * math.cos(math.pi * 256 / 2000))
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match="1-D"):
        hbpo_reward(torch.ones(3), torch.ones(2), torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D"):
        hbpo_reward(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool),
                    torch.ones(2, 2, dtype=torch.bool))


def test_binary_reward():
    got = binary_reward(torch.tensor([True, False, True]), torch.tensor([True, True, False]), format_error_reward=-1.0,
                        dtype=torch.float64)
    assert got.tolist() == [1.0, 0.0, -1.0]
    assert got.dtype == torch.float64
