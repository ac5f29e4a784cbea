"""SDPA core attention against Megatron's own DotProductAttention, alone and inside a GPTModel.

    torchrun --nproc-per-node 1|2 attention_equivalence.py        (TP = number of processes)

1. Core attention: `SdpaAttention` and `DotProductAttention` built from the same TransformerConfig
   (8 query heads, 2 key-value groups: GQA, split over TP) get the same q, k, v and mask; outputs
   and the gradients of q, k, v must agree, for masks: plain causal (the is_causal path), causal
   with right padding, left padding (rows that may attend to nothing), tree-shaped packed rows, and
   no masking at all.
2. Whole model: a tiny Qwen2 GPTModel with the sdpa spec and one with the unfused spec, same
   weights: logits and every parameter gradient of a weighted log-prob loss must agree.

Differences are max |sdpa - unfused| over max(1, max |unfused|). Tolerances: fp32 on CPU 1e-6
for both. On CUDA the same in fp32
with looser bounds (different kernels), plus bf16 against fp32 and the kernel each case ran (the
causal case must run with flash alone enabled). Each rank reports its cases and failures as JSON
(tests/dist/common.write_report).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from common import write_report

from megatron_hbpo import runtime
from megatron_hbpo.config import ModelConfig, ParallelConfig
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.attention import SdpaAttention, plan_mask, sdpa_kernels_used, shared_prefix_mask
from megatron_hbpo.megatron.logprobs import token_logprobs
from megatron_hbpo.megatron.model import build_gpt_model, hf_config_from_recipe, transformer_config

ON_GPU = torch.cuda.is_available()
TOL_CORE = 1e-5 if ON_GPU else 1e-6
TOL_MODEL = 1e-5 if ON_GPU else 1e-6
TOL_BF16 = 3e-2  # bf16 SDPA vs fp32 unfused, on values of order 1
VOCAB = 100
CASES: list[str] = []  # one line per compared case, for the report


def causal(s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).triu(1)


def padded_mask(lengths: list[int], s: int, *, left: bool) -> torch.Tensor:
    """[b, 1, s, s]: causal and no key outside a row's real tokens. Left padding leaves the padded
    query rows with nothing to attend to."""
    keys = torch.arange(s)
    real = torch.stack([(keys >= s - n) if left else (keys < n) for n in lengths])  # [b, s]
    return (causal(s) | ~real[:, None, :]).unsqueeze(1)


def tree_mask(rows: list[tuple[int, list[int]]], s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, 1, s, s] mask and [b, s] positions of packed rows (prompt length, [branch lengths])."""
    masks, positions = zip(*(shared_prefix_mask(prompt, branches, s) for prompt, branches in rows))
    return torch.stack(masks).unsqueeze(1), torch.stack(positions)


def mask_cases(b: int, s: int) -> dict[str, torch.Tensor | None]:
    tree, _ = tree_mask([(5, [4, 6, 3]), (9, [7, 2])][:b] + [(s, [])] * max(0, b - 2), s)
    return {
        "causal": causal(s)[None, None],
        "right padding": padded_mask([s, s - 5, s - 11][:b], s, left=False),
        "left padding": padded_mask([s, s - 5, s - 11][:b], s, left=True),
        "tree": tree,
        "none (bidirectional)": torch.zeros(1, 1, s, s, dtype=torch.bool),
    }


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale (max |b|, at least 1): fp32 rounding grows with
    the magnitude of what is summed."""
    return float((a.double() - b.double()).abs().max() / max(1.0, float(b.abs().max())))


def check_core(failures: list[str], rank: int, device: torch.device) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    model = ModelConfig(family="qwen2", num_layers=1, hidden_size=256, ffn_hidden_size=64, num_attention_heads=8,
                        num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=128, add_qkv_bias=True,
                        params_dtype="fp32", transformer_impl="local")
    tp = dist.get_world_size()
    config = transformer_config(hf_config_from_recipe(model), model, ParallelConfig(tensor_model_parallel_size=tp),
                                use_te=False)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    unfused, fused = DotProductAttention(**kwargs), SdpaAttention(**kwargs)
    heads, groups, head_dim = 8 // tp, 2 // tp, config.kv_channels
    b, s = 3, 24
    g = torch.Generator().manual_seed(100 + rank)
    q0 = torch.randn(s, b, heads, head_dim, generator=g)
    k0 = torch.randn(s, b, groups, head_dim, generator=g)
    v0 = torch.randn(s, b, groups, head_dim, generator=g)
    weight = torch.randn(s, b, heads * head_dim, generator=g).to(device)

    def run(module, mask, dtype=torch.float32):
        q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q0, k0, v0))
        out = module(q, k, v, None if mask is None else mask.to(device))
        (out.float() * weight).sum().backward()
        return out.float(), [t.grad.float() for t in (q, k, v)]

    for name, mask in mask_cases(b, s).items():
        ref_out, ref_grads = run(unfused, mask)
        kernels = sdpa_kernels_used(lambda mask=mask: run(fused, mask))
        out, grads = run(fused, mask)
        err = max([max_abs(out, ref_out)] + [max_abs(a, r) for a, r in zip(grads, ref_grads)])
        line = f"rank {rank} core {name}: max |sdpa - unfused| {err:.1e} (output and q/k/v grads), kernels {kernels}"
        if err > TOL_CORE:
            failures.append(f"core attention, {name} mask: {err:.2e} > {TOL_CORE}")
        if ON_GPU:
            bf16_out, bf16_grads = run(fused, mask, torch.bfloat16)
            bf16_err = max([max_abs(bf16_out, ref_out)] + [max_abs(a, r) for a, r in zip(bf16_grads, ref_grads)])
            bf16_kernels = sdpa_kernels_used(lambda mask=mask: run(fused, mask, torch.bfloat16))
            line += f"; bf16 vs fp32 {bf16_err:.1e}, kernels {bf16_kernels}"
            if bf16_err > TOL_BF16:
                failures.append(f"core attention bf16, {name} mask: {bf16_err:.2e} > {TOL_BF16}")
            if name == "causal":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        run(fused, mask, torch.bfloat16)
                except RuntimeError as error:
                    failures.append(f"the causal bf16 path cannot run on flash alone: {error}")
        CASES.append(line)
    # Unfused-equal results do not prove the fast path ran: the plain causal mask must reach SDPA as is_causal.
    if not plan_mask(mask_cases(b, s)["causal"], s, s, causal_type=True).is_causal:
        failures.append("a plain causal mask did not take the is_causal path")


def check_model(failures: list[str], rank: int, device: torch.device) -> None:
    tp = dist.get_world_size()
    models = {}
    for backend in ("unfused", "sdpa"):
        cfg = ModelConfig(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                          num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=1e6,
                          add_qkv_bias=True, params_dtype="fp32", transformer_impl="local", attention_backend=backend)
        models[backend] = build_gpt_model(hf_config_from_recipe(cfg), cfg,
                                          ParallelConfig(tensor_model_parallel_size=tp))
    models["sdpa"].load_state_dict(models["unfused"].state_dict())
    kinds = {type(layer.self_attention.core_attention).__name__ for layer in models["sdpa"].decoder.layers}
    if kinds != {"SdpaAttention"}:
        failures.append(f"the sdpa spec built {kinds}")

    b, s = 3, 30
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    weights = torch.randn(b, s, generator=g).to(device)
    straight = torch.arange(s).expand(b, s)
    tree, tree_positions = tree_mask([(6, [10, 8]), (12, [5, 5, 4]), (4, [20])], s)
    cases = {name: (mask, straight) for name, mask in mask_cases(b, s).items()}
    cases["tree"] = (tree, tree_positions)
    for name, (mask, positions) in cases.items():
        results = {}
        for backend, gpt in models.items():
            gpt.zero_grad(set_to_none=True)
            logits = gpt(tokens, positions.to(device), mask.to(device))
            logp, _ = token_logprobs(logits, labels, vocab_size=VOCAB)
            (-(logp * weights).sum()).backward()
            results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters()})
        (ref_logits, ref_grads), (logits, grads) = results["unfused"], results["sdpa"]
        logit_err = max_abs(logits, ref_logits)
        grad_err = max(max_abs(grads[n], ref_grads[n]) for n in ref_grads)
        CASES.append(f"rank {rank} model {name}: max |sdpa - unfused| logits {logit_err:.1e}, grads {grad_err:.1e}")
        if max(logit_err, grad_err) > TOL_MODEL:
            failures.append(f"GPTModel, {name} mask: logits {logit_err:.2e}, grads {grad_err:.2e} > {TOL_MODEL}")


def main() -> int:
    import os

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    runtime.configure()
    parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp), seed=1234)
    if ON_GPU:  # compare fp32 kernels, not TF32 rounding
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if ON_GPU else torch.device("cpu")
    failures: list[str] = []
    check_core(failures, rank, device)
    check_model(failures, rank, device)
    dist.barrier()
    dist.destroy_process_group()
    write_report({"cases": CASES, "failures": failures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
