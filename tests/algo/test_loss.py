"""clipped_policy_loss against docs/method.md, recomputed token by token with Python floats."""

import math
import random

import pytest
import torch

from megatron_hbpo.algo.loss import clipped_policy_loss, kl_estimate

EL, EH, C = 0.2, 0.28, 3.0


def reference_token(logp_new, logp_old, adv, el=EL, eh=EH, c=C):
    """(loss, d loss / d logp_new) of one token, from the spec's equations."""
    rho = math.exp(logp_new - logp_old)
    unclipped, clipped = rho * adv, min(max(rho, 1 - el), 1 + eh) * adv
    loss = -min(unclipped, clipped)
    grad = -adv * rho if unclipped <= clipped else 0.0  # the clipped branch is constant in logp
    if adv < 0 and loss > -c * adv:
        loss, grad = -c * adv, 0.0
    return loss, grad


def test_matches_reference_sum_count_and_gradient():
    rng = random.Random(0)
    B, T = 6, 9
    logp_old = torch.tensor([[rng.uniform(-4, -0.1) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    logp_new = (logp_old + torch.tensor([[rng.uniform(-1.5, 1.5) for _ in range(T)] for _ in range(B)],
                                        dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([rng.uniform(-2, 2) for _ in range(B)], dtype=torch.float64)
    lengths = [9, 3, 7, 1, 5, 8]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]

    out = clipped_policy_loss(logp_new, logp_old, adv, mask, clip_eps_low=EL, clip_eps_high=EH, dual_clip_c=C)
    out.loss_sum.backward()

    want_sum, want_grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t in range(lengths[i]):
            loss, grad = reference_token(logp_new[i, t].item(), logp_old[i, t].item(), adv[i].item())
            want_sum += loss
            want_grad[i, t] = grad
    assert out.num_tokens.item() == sum(lengths)
    assert out.loss_sum.item() == pytest.approx(want_sum, abs=1e-10)
    assert torch.allclose(logp_new.grad, want_grad, atol=1e-12)


@pytest.mark.parametrize(
    "log_ratio, adv, want_loss, clipped, dual",
    [
        (0.0, 1.0, -1.0, 0, 0),  # rho = 1: plain -A
        (math.log(1.5), 1.0, -1.28, 1, 0),  # A > 0, rho above 1 + eps_high: clipped
        (math.log(0.5), 1.0, -0.5, 0, 0),  # A > 0, rho low: unclipped (pessimistic branch)
        (math.log(0.5), -1.0, 0.8, 1, 0),  # A < 0, rho below 1 - eps_low: clipped
        (math.log(2.0), -1.0, 2.0, 0, 0),  # A < 0, rho = 2 < c: unclipped
        (math.log(5.0), -1.0, 3.0, 0, 1),  # A < 0, rho = 5 > c: dual clip at -c A
    ],
)
def test_clip_regimes(log_ratio, adv, want_loss, clipped, dual):
    logp_old = torch.tensor([[-1.0]], dtype=torch.float64)
    out = clipped_policy_loss(logp_old + log_ratio, logp_old, torch.tensor([adv], dtype=torch.float64),
                              torch.ones(1, 1, dtype=torch.bool))
    assert out.loss_sum.item() == pytest.approx(want_loss, abs=1e-12)
    assert (out.clipped_tokens.item(), out.dual_clipped_tokens.item()) == (clipped, dual)


def test_token_mean_is_independent_of_the_split():
    torch.manual_seed(0)
    B, T = 8, 12
    logp_old = -torch.rand(B, T, dtype=torch.float64) * 3
    logp_new = (logp_old + 0.3 * torch.randn(B, T, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,))[:, None]

    whole = clipped_policy_loss(logp_new, logp_old, adv, mask)
    (whole.loss_sum / whole.num_tokens).backward()
    grad_whole = logp_new.grad.clone()
    logp_new.grad = None

    # Uneven micro-batches, each normalised by the global count (what train_step does).
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]
    total = sum(int(mask[p].sum()) for p in parts)
    loss = 0.0
    for p in parts:
        out = clipped_policy_loss(logp_new[p], logp_old[p], adv[p], mask[p])
        (out.loss_sum / total).backward()
        loss += out.loss_sum.item() / total
    assert loss == pytest.approx((whole.loss_sum / whole.num_tokens).item(), abs=1e-12)
    assert torch.allclose(logp_new.grad, grad_whole, atol=1e-14)

    # Per-micro-batch means (the mistake the spec warns about) would give another loss.
    per_mb = sum(clipped_policy_loss(logp_new[p], logp_old[p], adv[p], mask[p]).loss_sum.item()
                 / int(mask[p].sum()) for p in parts) / len(parts)
    assert abs(per_mb - loss) > 1e-6


def test_masked_garbage_never_makes_nan():
    logp_old = torch.tensor([[-1.0, float("-inf")]], dtype=torch.float64)
    logp_new = torch.tensor([[-0.9, float("inf")]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False]])
    out = clipped_policy_loss(logp_new, logp_old, torch.tensor([1.0], dtype=torch.float64), mask,
                              logp_ref=torch.tensor([[-1.0, float("nan")]], dtype=torch.float64), kl_coef=0.1)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(logp_new.grad).all()
    assert logp_new.grad[0, 1].item() == 0.0


def test_per_token_advantages_and_shape_errors():
    logp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    per_seq = clipped_policy_loss(logp, logp, torch.tensor([1.0, -2.0], dtype=torch.float64), mask)
    per_tok = clipped_policy_loss(logp, logp, torch.tensor([[1.0] * 3, [-2.0] * 3], dtype=torch.float64), mask)
    assert per_seq.loss_sum.item() == per_tok.loss_sum.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(logp, logp, torch.ones(3), mask)
    with pytest.raises(ValueError, match="one shape"):
        clipped_policy_loss(logp, logp[:, :2], torch.ones(2), mask)


def test_kl_estimators_and_penalty():
    logp, ref = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.5, -1.0], dtype=torch.float64)
    r = [0.5, -1.0]
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx(r)
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([x * x / 2 for x in r])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-x) - 1 + x for x in r])
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k4")
    mask = torch.ones(1, 2, dtype=torch.bool)
    base = clipped_policy_loss(logp[None], logp[None], torch.zeros(1, dtype=torch.float64), mask)
    with_kl = clipped_policy_loss(logp[None], logp[None], torch.zeros(1, dtype=torch.float64), mask,
                                  logp_ref=ref[None], kl_coef=0.5)
    k3 = sum(math.exp(-x) - 1 + x for x in r)
    assert with_kl.loss_sum.item() - base.loss_sum.item() == pytest.approx(0.5 * k3)
    assert with_kl.kl_sum.item() == pytest.approx(k3)


def test_importance_weights_scale_each_tokens_surrogate():
    logp_old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    logp_new = (logp_old + torch.tensor([[0.1, -0.1, 0.0]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    weights = torch.tensor([[0.5, 2.0, float("nan")]], dtype=torch.float64)  # NaN off the mask is ignored
    out = clipped_policy_loss(logp_new, logp_old, adv, mask, importance_weights=weights)
    want = 0.5 * reference_token(-0.9, -1.0, 1.0)[0] + 2.0 * reference_token(-2.1, -2.0, 1.0)[0]
    assert out.loss_sum.item() == pytest.approx(want, abs=1e-12)
    out.loss_sum.backward()
    assert logp_new.grad[0, 0].item() == pytest.approx(0.5 * reference_token(-0.9, -1.0, 1.0)[1])


def test_mismatch_metric_and_truncated_weights():
    from megatron_hbpo.algo.mismatch import logprob_mismatch, truncated_importance_weights

    rollout = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    train = torch.tensor([-1.0, -2.5, -3.05, -4.0])
    stats = logprob_mismatch(rollout, train, threshold=0.1)
    assert stats["mean_abs"] == pytest.approx(0.55 / 4) and stats["max_abs"] == pytest.approx(0.5)
    assert stats["frac_above"] == 0.25 and stats["tokens"] == 4
    w = truncated_importance_weights(train, rollout, cap=1.2)
    assert w.tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-0.05), 1.0])
    assert truncated_importance_weights(torch.tensor([0.0]), torch.tensor([-5.0]), cap=2.0).item() == 2.0
