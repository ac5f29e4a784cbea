"""Core attention: which implementation a layer spec gets, and one built on torch's SDPA.

`model.attention_backend` picks the `core_attention` module of Megatron's layer spec:

    te       Transformer Engine's DotProductAttention (fused flash / cuDNN kernels); needs TE layers
    sdpa     `SdpaAttention` below: torch.nn.functional.scaled_dot_product_attention, which picks a
             fused kernel (flash, memory-efficient or cuDNN on GPU, flash on CPU) per call
    unfused  Megatron's DotProductAttention: explicit [b, heads, s, s] scores, masked softmax, bmm
    auto     te where Transformer Engine layers are used, sdpa otherwise (GPU and CPU: on CPU sdpa is
             exact to unfused and, in fp32, no slower; BENCHMARKS.md "Attention backends")

Mask semantics are Megatron's: a boolean `attention_mask` broadcastable to [b, 1, sq, sk] where
True means "may not attend". `SdpaAttention` accepts any such mask (padding, tree-shaped masks of
packed rows whose summaries share a prefix) and reproduces DotProductAttention's result, including
its treatment of a query row that may attend to nothing (Megatron fills masked scores with -10000,
so such a row attends uniformly to every key; fused kernels would return 0 or NaN there).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_hbpo.config import ConfigError

BACKENDS = ("auto", "te", "sdpa", "unfused")


def resolve_backend(requested: str, *, use_te: bool) -> str:
    """The backend `requested` means with (use_te) or without Transformer Engine layers: te, sdpa or unfused."""
    if requested not in BACKENDS:
        raise ConfigError(f"model.attention_backend: unknown backend {requested!r}; use one of {list(BACKENDS)}")
    if requested == "te" and not use_te:
        raise ConfigError("model.attention_backend: te needs Transformer Engine layers (CUDA, the transformer-engine "
                          "package and model.transformer_impl auto or transformer_engine); use sdpa or auto")
    if requested == "auto":
        return "te" if use_te else "sdpa"
    return requested


def layer_spec(*, use_te: bool, backend: str):
    """Megatron's GPT layer spec (TE or local modules) with the core attention of `backend`."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    resolved = resolve_backend(backend, use_te=use_te)
    spec = get_gpt_layer_with_transformer_engine_spec() if use_te else get_gpt_layer_local_spec(normalization="RMSNorm")
    if resolved != "te":
        spec.submodules.self_attention.submodules.core_attention = (
            SdpaAttention if resolved == "sdpa" else DotProductAttention)
    return spec


def shared_prefix_mask(prompt_length: int, branch_lengths: list[int], length: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row: a prompt, then branches (e.g. several summaries of it) that each attend to the
    prompt and to their own earlier tokens, never to each other; the rest of the row is padding that
    attends causally to everything before it.

    Returns (mask [length, length] bool, True = masked: Megatron's convention; position ids [length]:
    each branch continues from the prompt's last position, padding continues from the row's end).
    """
    return branch_mask(prompt_length, [(prompt_length, b) for b in branch_lengths], length)


def branch_mask(trunk_length: int, branches: list[tuple[int, int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A tree-shaped packed row: a causal trunk of `trunk_length` tokens, then branches laid out one after
    another, branch k = (context, span) seeing the trunk's first `context` tokens and its own earlier tokens
    (never another branch, nor the trunk beyond `context`), at positions context, context + 1, ...; the
    rest of the row is padding that attends causally to everything before it.

    This is the anytime row of docs/anytime.md ("Integration"): the trunk is prompt + thinking, a branch
    is one summary with its inserted tokens, its context the prompt plus the thinking up to its cut.
    Returns (mask [length, length] bool, True = masked; position ids [length]).
    """
    used = trunk_length + sum(span for _, span in branches)
    if used > length:
        raise ValueError(f"trunk {trunk_length} + branches {[s for _, s in branches]} exceed the row length {length}")
    if any(not 0 <= context <= trunk_length for context, _ in branches):
        raise ValueError(f"a branch's context must lie within the trunk of {trunk_length} tokens, got {branches}")
    lower = torch.ones(length, length, dtype=torch.bool).tril_()
    allowed = torch.zeros(length, length, dtype=torch.bool)
    positions = torch.arange(length)
    allowed[:trunk_length, :trunk_length] = lower[:trunk_length, :trunk_length]
    start = trunk_length
    for context, branch in branches:
        span = slice(start, start + branch)
        allowed[span, :context] = True
        allowed[span, span] = lower[:branch, :branch]
        positions[span] = torch.arange(context, context + branch)
        start += branch
    allowed[used:] = lower[used:]
    return ~allowed, positions


class _MaskPlan:
    """What one attention mask turns into for SDPA: `is_causal`, or a boolean mask of allowed pairs;
    `dead_rows` ([b, 1, sq, 1] or None): query rows Megatron's mask leaves nothing to attend to."""

    def __init__(self, is_causal: bool, allowed: torch.Tensor | None, dead_rows: torch.Tensor | None = None):
        self.is_causal = is_causal
        self.allowed = allowed
        self.dead_rows = dead_rows


def plan_mask(mask: torch.Tensor | None, sq: int, sk: int, *, causal_type: bool) -> _MaskPlan:
    """Megatron mask (True = masked, broadcastable to [b, 1, sq, sk]) -> SDPA arguments.

    A mask equal to the causal triangle becomes `is_causal=True` and no tensor (the flash kernels
    take no mask tensor). Rows masked entirely are opened (so that no kernel divides by zero) and
    marked: Megatron's -10000 fill makes every score of such a row equal, so it attends uniformly
    and `sdpa` gives it the mean of the values. causal_type: the spec's mask type is causal, which
    Megatron applies when no mask is given.
    """
    if mask is None:
        return _MaskPlan(is_causal=causal_type and sq == sk and sq > 1, allowed=None)
    if mask.dtype != torch.bool:
        raise TypeError(f"attention_mask must be boolean (True = masked), got {mask.dtype}")
    if mask.shape[-2:] != (sq, sk) and mask.shape[-2:] != (1, sk):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not broadcast to [b, 1, {sq}, {sk}]")
    if sq == sk and mask.shape[-2] == sq:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu_(1)
        if bool((mask == causal).all()):
            return _MaskPlan(is_causal=True, allowed=None)
    dead = mask.all(dim=-1, keepdim=True)
    if not bool(dead.any()):
        return _MaskPlan(is_causal=False, allowed=~mask)
    return _MaskPlan(is_causal=False, allowed=~mask | dead, dead_rows=dead)


class _LastMask:
    """The plan of the last mask seen. Every layer of a forward pass gets the same mask tensor, so the
    mask is inspected (an O(s^2) comparison and a host sync on GPU) once per micro-batch, not per layer.
    A hit needs the same live tensor, or a detached view of it (what recomputation passes), unmodified."""

    def __init__(self):
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._plan: _MaskPlan | None = None

    @staticmethod
    def _key_of(mask: torch.Tensor) -> tuple:
        return (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.device, mask._version)

    def get(self, mask: torch.Tensor, sq: int, sk: int, causal_type: bool) -> _MaskPlan:
        held = self._ref() if self._ref is not None else None
        key = (*self._key_of(mask), sq, sk, causal_type)
        # While the first tensor lives its memory cannot be reused, so an equal key means the same data
        # (views share the version counter, so an in-place change shows in the key).
        if held is not None and key == self._key and self._plan is not None:
            return self._plan
        plan = plan_mask(mask, sq, sk, causal_type=causal_type)
        self._ref, self._key, self._plan = weakref.ref(mask, self._forget), key, plan
        return plan

    def _forget(self, _ref) -> None:
        self._ref, self._key, self._plan = None, (), None


_last_mask = _LastMask()


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _MaskPlan, scale: float) -> torch.Tensor:
    """SDPA on [b, heads, s, d] tensors; key/value may have fewer (grouped) heads."""
    groups = query.size(1) // key.size(1)
    if plan.allowed is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=plan.is_causal, scale=scale,
                                              enable_gqa=groups > 1)
    if groups > 1:
        # On CUDA only flash and math take grouped heads, and flash takes no mask: expanding lets
        # the memory-efficient kernel run instead of math.
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=plan.allowed, scale=scale)
    if plan.dead_rows is not None:
        context = torch.where(plan.dead_rows, value.mean(dim=-2, keepdim=True), context)
    return context


class SdpaAttention(MegatronModule):
    """Drop-in for Megatron's DotProductAttention (same constructor and forward), on torch SDPA.

    forward(query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask) -> [sq, b, np * hn],
    where np / ng are this TP rank's query heads / key-value groups. Softmax scale as Megatron's:
    `softmax_scale` or 1 / sqrt(hn) (query-key layer scaling divides and re-multiplies the same
    factor, so it does not change the result). Dropout is not supported (the recipes use 0).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {
            "attention dropout": dropout != 0.0,
            "context parallelism": config.context_parallel_size != 1,
            f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
            "sliding-window attention": config.window_size is not None,
        }
        problems = [name for name, bad in unsupported.items() if bad]
        if problems:
            raise ConfigError(f"model.attention_backend: sdpa does not support {', '.join(problems)}; "
                              "use attention_backend te or unfused")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self._causal_type = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SdpaAttention takes neither packed_seq_params (THD) nor attention_bias; "
                                      "express packing as a boolean attention_mask")
        sq, b, heads, head_dim = query.shape
        sk = key.size(0)
        if attention_mask is None:
            plan = plan_mask(None, sq, sk, causal_type=self._causal_type)
        else:
            plan = _last_mask.get(attention_mask, sq, sk, self._causal_type)
        # [s, b, h, d] -> [b, h, s, d]: a view whose last dimension stays contiguous, as the kernels need.
        context = sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), plan,
                       self.softmax_scale)
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)


_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def sdpa_kernels_used(fn: Callable[[], object]) -> list[str]:
    """The SDPA kernels that ran inside fn(), forward and backward, read from the profiler's op names
    (the dispatcher's own record of its choice, e.g. ["flash"]); sorted, without repeats."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    used = set()
    for event in prof.events():
        name = event.name.removesuffix("_backward")
        if name in _KERNELS:
            used.add(_KERNELS[name])
    return sorted(used)
