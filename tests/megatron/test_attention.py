"""SDPA core attention: mask handling against a float64 reference, backend choice, and (under torchrun)
equality with Megatron's DotProductAttention and the bf16 training path (tests/dist/ scripts)."""

import math

import pytest
import torch

from conftest import REPO, run_torchrun
from megatron_hbpo.config import ConfigError, load_recipe
from megatron_hbpo.megatron.attention import _LastMask, plan_mask, resolve_backend, sdpa, sdpa_kernels_used, \
    shared_prefix_mask

TINY = REPO / "recipes" / "tiny_cpu.yaml"


def causal(s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).triu(1)


def reference_attention(q, k, v, mask, scale):
    """Float64 attention with Megatron's semantics: masked pairs excluded, a row with every key masked
    attends uniformly (Megatron fills masked scores with one constant)."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    mask = mask.expand_as(scores)
    dead = mask.all(-1, keepdim=True)
    scores = torch.where(dead, torch.zeros_like(scores), scores.masked_fill(mask, -math.inf))
    return scores.softmax(-1) @ v


def test_plain_causal_masks_take_the_is_causal_path():
    s = 12
    assert plan_mask(causal(s)[None, None], s, s, causal_type=True).is_causal
    assert plan_mask(causal(s).expand(3, 1, s, s), s, s, causal_type=False).is_causal
    assert plan_mask(None, s, s, causal_type=True).is_causal
    assert not plan_mask(None, s, s, causal_type=False).is_causal
    # Decoding against a longer key sequence: SDPA's is_causal aligns top-left, Megatron does not.
    plan = plan_mask(torch.zeros(1, 1, 4, s, dtype=torch.bool), 4, s, causal_type=True)
    assert not plan.is_causal and plan.allowed is not None
    with pytest.raises(TypeError, match="boolean"):
        plan_mask(causal(s).float(), s, s, causal_type=True)


def test_padding_and_rows_with_nothing_to_attend_to():
    s = 8
    keys = torch.arange(s)
    right = causal(s) | (keys >= 5)[None, None, None, :]
    plan = plan_mask(right, s, s, causal_type=True)
    assert not plan.is_causal and plan.dead_rows is None and torch.equal(plan.allowed, ~right)
    left = causal(s) | (keys < 3)[None, None, None, :]  # rows 0-2 see nothing
    plan = plan_mask(left, s, s, causal_type=True)
    assert plan.dead_rows.flatten().tolist() == [True] * 3 + [False] * 5
    assert bool(plan.allowed[..., :3, :].all())  # opened, so no kernel divides by zero


@pytest.mark.parametrize("case", ["causal", "tree", "left padding", "bidirectional"])
def test_sdpa_equals_float64_reference(case):
    g = torch.Generator().manual_seed(0)
    b, heads, groups, s, d = 2, 6, 2, 20, 16
    q = torch.randn(b, heads, s, d, generator=g)
    k, v = torch.randn(b, groups, s, d, generator=g), torch.randn(b, groups, s, d, generator=g)
    if case == "causal":
        mask = causal(s)[None, None]
    elif case == "tree":  # prompt 6, then branches of 5 and 9 that see the prompt but not each other
        allowed = torch.zeros(s, s, dtype=torch.bool)
        allowed[:6, :6] = ~causal(6)
        for start, end in ((6, 11), (11, 20)):
            allowed[start:end, :6] = True
            allowed[start:end, start:end] = ~causal(end - start)
        mask = (~allowed)[None, None]
        built, positions = shared_prefix_mask(6, [5, 9], s)
        assert torch.equal(built, mask[0, 0])
        assert positions.tolist() == list(range(6)) + list(range(6, 11)) + list(range(6, 15))
    elif case == "left padding":
        mask = (causal(s) | (torch.arange(s) < 4)[None, :])[None, None].expand(b, 1, s, s).clone()
        mask[1] = causal(s)
    else:
        mask = torch.zeros(1, 1, s, s, dtype=torch.bool)
    scale = 1 / math.sqrt(d)
    out = sdpa(q, k, v, plan_mask(mask, s, s, causal_type=True), scale)
    assert float((out.double() - reference_attention(q, k, v, mask, scale)).abs().max()) < 2e-6


def test_a_mask_is_inspected_once_until_it_changes():
    cache, s = _LastMask(), 10
    mask = causal(s)[None, None].clone()
    first = cache.get(mask, s, s, True)
    assert first.is_causal
    assert cache.get(mask, s, s, True) is first
    assert cache.get(mask.detach(), s, s, True) is first  # what recomputation hands over
    mask[0, 0, 5, 0] = True  # in place: same tensor, new content
    changed = cache.get(mask, s, s, True)
    assert changed is not first and not changed.is_causal
    other = causal(s)[None, None].clone()
    assert cache.get(other, s, s, True).is_causal


def test_backend_resolution_and_validation():
    assert resolve_backend("auto", use_te=True) == "te"
    assert resolve_backend("auto", use_te=False) == "sdpa"
    assert resolve_backend("unfused", use_te=True) == "unfused"
    with pytest.raises(ConfigError, match="model.attention_backend: te needs Transformer Engine"):
        resolve_backend("te", use_te=False)
    assert load_recipe(TINY).model.attention_backend == "auto"
    with pytest.raises(ConfigError, match="model.attention_backend"):
        load_recipe(TINY, ["model.attention_backend=te", "model.transformer_impl=local"])
    with pytest.raises(ConfigError, match="model.attention_backend"):
        load_recipe(TINY, ["model.attention_backend=flash"])


def test_the_kernel_that_ran_is_reported():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    plan = plan_mask(causal(16)[None, None], 16, 16, causal_type=True)
    kernels = sdpa_kernels_used(lambda: sdpa(q, q, q, plan, 0.3).sum().backward())
    assert kernels == ["flash (CPU)"]


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_equals_megatron_dot_product_attention(tp):
    result = run_torchrun("attention_equivalence.py", nproc=tp)
    assert len(result.reports) == tp
    for rank, report in enumerate(result.reports):
        assert report["failures"] == []  # every case within 1e-6 of Megatron's own attention (fp32)
        cases = report["cases"]
        assert sum(c.startswith(f"rank {rank} core ") for c in cases) == 5
        assert sum(c.startswith(f"rank {rank} model ") for c in cases) == 5


@pytest.mark.dist
def test_bf16_step_matches_fp32_with_and_without_recompute():
    [report] = run_torchrun("bf16_step.py", nproc=1).reports
    assert report["failures"] == []
    assert set(report["steps"]) == {"None", "selective", "full"}
    for recompute, step in report["steps"].items():
        assert step["relative_loss_diff"] <= 0.01 and step["lowest_cosine"] >= 0.99, (recompute, step)
        assert step["core_attention_runs"] == (1 if recompute == "None" else 2)  # recompute really recomputes
        assert step["fp32_main_weights"] > 0 and step["grad_norm"] > 0


def test_the_planner_counts_unfused_attention_scores():
    from megatron_hbpo.plan import GIB, plan

    def activations(*overrides):
        return plan(load_recipe(REPO / "recipes" / "r1_distill_qwen_1p5b.yaml", list(overrides))).activations_gib

    base = activations()  # selective recompute: the scores are recomputed, never stored
    assert activations("model.attention_backend=unfused") == base == activations("model.attention_backend=sdpa")
    unfused = activations("model.attention_backend=unfused", "parallel.recompute_granularity=null")
    flash = activations("parallel.recompute_granularity=null")
    # 16384 tokens, 28 layers, 12 heads, sequences of 1024 + 4096 tokens, 6 bytes per pair.
    assert unfused - flash == pytest.approx(16384 * 28 * 6 * 12 * 5120 / GIB)
