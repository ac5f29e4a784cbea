"""One-command GPU check of the HBPO training stack: speed, MFU, memory, and the parts that need a GPU.

    PYTHONPATH=$PWD:$PWD/.pydeps python tools/gpu_check.py --out gpu_check        (one H100/H200, < 3 min)
    PYTHONPATH=$PWD python tools/gpu_check.py --cpu-tiny --out /tmp/gpu_check      (CPU, seconds; CI)

Stages, in order; each writes OUT/<stage>.json the moment it ends (status ok / skipped / error), so
a run cut short keeps what finished, and a failing stage does not stop the others:

  env          versions, device, what is installed
  attention    core attention alone at the step's shape: the SDPA kernel that ran for the causal and
               for a tree-shaped mask (torch profiler op names), its time against Megatron's unfused
               attention, and both errors against SDPA in fp32
  hf_baseline  the update below with transformers' Qwen2ForCausalLM of the same shape (SDPA attention,
               bf16 params, torch AdamW, one sequence per micro-batch): tokens/s
  train        MegatronPolicy.train_step (HBPO clipped loss) on the DeepSeek-R1-Distill-Qwen-1.5B shape
               (Qwen2: 28 layers, hidden 1536, ffn 8960, 12 heads, 2 KV heads, vocab 151936, untied,
               random weights), bf16 + fp32 main weights, SDPA, recompute as the recipe
               (recipes/r1_distill_qwen_1p5b.yaml: selective); sequences of 1024 prompt + 3072 response
               tokens, micro-batches of train.micro_batch_tokens (16384, halved until the planner says
               the layout fits the GPU): tokens/s, MFU, and the speed relative to hf_baseline
  logp         MegatronPolicy.logprobs (the logp_old pass): tokens/s
  plan         the fit planner's training-phase memory for the measured layout vs the CUDA peak
  export       HFExportStream: GB/s of full HF tensors produced (on the device, and copied to host)
  vllm         (vLLM installed) refit seconds through VLLMEngine.update_weights, and the log-prob
               mismatch between vLLM's samples and the policy's log-probs of them
  te, te_fp8   (Transformer Engine importable) the train stage with TE layers and attention, and with
               FP8 (delayed scaling) on GPUs of compute capability 8.9+

MFU = model FLOPs of the update / (update seconds x the GPU's dense bf16 peak: 989 TFLOP/s for H100
SXM and H200). Model FLOPs per sequence of s tokens: 6 N s + 6 L h s^2, where N counts the matmul
weights (QKV, output projection, SwiGLU MLP, output layer; not the embedding lookup or norms) and
6 L h s^2 (h = heads x head dim) is the causal half of the usual 12 L h s^2 for QK^T and AV.
Recomputation is not counted (model FLOPs, not hardware FLOPs); the update time includes the
optimizer step. `--cpu-tiny` runs every stage on a tiny model on CPU (one thread unless
OMP_NUM_THREADS is set) so that CI exercises the code; its MFU is computed against the H100 peak
only to exercise the formula and is labelled meaningless.

Needs PyTorch with CUDA, transformers (both on the GPU image), and megatron-core 0.16.1, whose
imports on these paths need only numpy and packaging (on the image) besides torch; Transformer
Engine and vLLM are optional. To bring megatron-core to a machine without network (from one with):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        -d .whl megatron-core==0.16.1
    # on the GPU machine, from the repository root:
    pip install --no-index --no-deps --target .pydeps .whl/megatron_core-0.16.1-*.whl
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_hbpo import runtime  # noqa: E402

# Before torch first looks for devices: --cpu-tiny takes the CPU path even on a GPU machine.
runtime.configure(cpu_only="--cpu-tiny" in sys.argv)

import torch  # noqa: E402

from bench_train_step import PEAK_BF16, model_flops_per_sequence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
H100_PEAK = PEAK_BF16["H100"]


class Skip(Exception):
    """A stage that cannot run here (a missing package, no GPU); the message says why, in one line."""


@dataclass
class Mode:
    recipe: str
    prompt: int
    response: int
    sequences: int
    steps: int
    overrides: list[str]


FULL = Mode("recipes/r1_distill_qwen_1p5b.yaml", prompt=1024, response=3072, sequences=16, steps=3,
            overrides=["model.hf_path=null", "cluster.nodes=1", "cluster.gpus_per_node=1"])
# The tiny CPU model, but on the GPU recipe's precision path: bf16, SDPA, selective recompute.
TINY = Mode("recipes/tiny_cpu.yaml", prompt=16, response=48, sequences=8, steps=2,
            overrides=["model.params_dtype=bf16", "parallel.recompute_granularity=selective",
                       "optimizer.use_distributed_optimizer=true", "train.micro_batch_tokens=256",
                       "cluster.gpus_per_node=1"])


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    on_gpu: bool
    recipe: Any = None
    hf_config: Any = None
    sequences: list = field(default_factory=list)
    policy: Any = None
    results: dict = field(default_factory=dict)

    def value(self, stage: str, key: str) -> Any:
        """A number an earlier stage produced, or None if it did not run or has no such number."""
        return (self.results.get(stage) or {}).get(key)

    def relative_speed(self, tokens_per_s: float, stage: str) -> float | None:
        """tokens_per_s over an earlier stage's tokens/s."""
        other = self.value(stage, "tokens_per_s")
        return tokens_per_s / other if other else None

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    @property
    def peak_flops(self) -> tuple[float, bool]:
        """(dense bf16 FLOP/s of this device, whether that number is meaningful)."""
        if not self.on_gpu:
            return H100_PEAK, False
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        return (peak, True) if peak else (math.nan, False)


# -- helpers -----------------------------------------------------------------------------------------


def load_layout(mode: Mode, args: argparse.Namespace, on_gpu: bool, extra: list[str] = ()) -> Any:
    """The recipe of the measured layout: one GPU; on GPU the largest micro-batch (<= the recipe's) that
    the planner says fits."""
    from megatron_hbpo.config import load_recipe
    from megatron_hbpo.plan import plan

    overrides = list(mode.overrides) + list(extra)
    if on_gpu:
        overrides.append("cluster.gpu=" + ("H200-141GB" if "H200" in torch.cuda.get_device_name() else "H100-80GB"))
    if args.micro_batch_tokens:
        overrides.append(f"train.micro_batch_tokens={args.micro_batch_tokens}")
    recipe = load_recipe(REPO / mode.recipe, overrides, world_size=1)
    length = mode.prompt + mode.response
    while on_gpu and not args.micro_batch_tokens and not plan(recipe).fits and \
            recipe.train.micro_batch_tokens // 2 >= max(length, recipe.rollout.max_prompt_length
                                                         + recipe.rollout.max_response_length):
        recipe.train.micro_batch_tokens //= 2
        print(f"  the planner says the layout does not fit one {recipe.cluster.gpu}: micro-batches of "
              f"{recipe.train.micro_batch_tokens} tokens", flush=True)
    return recipe


def fixed_sequences(count: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list:
    from megatron_hbpo.megatron.batching import PolicySequence

    g = torch.Generator().manual_seed(seed)
    return [PolicySequence(torch.randint(0, vocab, (prompt + response,), generator=g).tolist(), prompt,
                           advantage=float(torch.randn(1, generator=g))) for _ in range(count)]


def set_logp_old(policy: Any, sequences: list) -> None:
    for seq, logp in zip(sequences, policy.logprobs(sequences, temperature=1.0)):
        seq.logp_old = logp


def build_policy(recipe: Any, hf_config: Any) -> Any:
    from megatron_hbpo.megatron.train_step import MegatronPolicy

    t = recipe.train
    return MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer,
                          micro_batch_tokens=t.micro_batch_tokens,
                          optimizer_steps=t.total_steps * (t.prompts_per_step // t.mini_batch_prompts))


def step_loss(recipe: Any) -> Any:
    """The recipe's method's loss, at temperature 1 (the random sequences stand for rollouts at 1)."""
    from megatron_hbpo.algo.methods import method_for

    return method_for(recipe.algo, l_max=recipe.rollout.max_response_length, temperature=1.0).loss()


def free(ctx: Context) -> None:
    ctx.policy = None
    gc.collect()
    if ctx.on_gpu:
        torch.cuda.empty_cache()


def measure_update(ctx: Context, policy: Any, recipe: Any) -> dict:
    """Time `steps` optimizer steps after one warm-up step; model FLOPs, MFU and the CUDA peak."""
    from megatron_hbpo.megatron.attention import resolve_backend, sdpa_kernels_used
    from megatron_hbpo.megatron.model import use_transformer_engine

    sequences = ctx.sequences
    set_logp_old(policy, sequences)
    loss = step_loss(recipe)
    policy.train_step(sequences, loss)  # allocation, autotuning, Adam state
    if ctx.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds, metrics = 0.0, None
    for _ in range(ctx.args.steps):
        set_logp_old(policy, sequences)
        ctx.sync()
        start = time.perf_counter()
        metrics = policy.train_step(sequences, loss)
        ctx.sync()
        seconds += time.perf_counter() - start
    peak_gib = torch.cuda.max_memory_allocated() / GIB if ctx.on_gpu else None
    tokens = sum(len(s.tokens) for s in sequences)
    flops = sum(model_flops_per_sequence(recipe, len(s.tokens)) for s in sequences)
    peak, meaningful = ctx.peak_flops
    per_micro_batch = max(1, recipe.train.micro_batch_tokens // len(sequences[0].tokens))
    kernels = sdpa_kernels_used(lambda: policy.forward_backward(sequences[:per_micro_batch], loss))
    use_te = use_transformer_engine(recipe.model.transformer_impl)
    return {
        "attention_backend": resolve_backend(recipe.model.attention_backend, use_te=use_te),
        "transformer_engine_layers": use_te, "fp8": recipe.model.fp8,
        "params_dtype": recipe.model.params_dtype, "recompute": recipe.parallel.recompute_granularity,
        "sequences": len(sequences), "sequence_tokens": len(sequences[0].tokens),
        "micro_batch_tokens": recipe.train.micro_batch_tokens, "micro_batches": metrics.micro_batches,
        "steps": ctx.args.steps, "tokens_per_step": tokens, "seconds_per_step": seconds / ctx.args.steps,
        "tokens_per_s": tokens * ctx.args.steps / seconds, "model_tflop_per_step": flops / 1e12,
        "mfu": flops * ctx.args.steps / seconds / peak, "mfu_meaningful": meaningful,
        "peak_tflops": peak / 1e12, "flop_formula": "6 N s + 6 L h s^2 per sequence (model FLOPs, causal)",
        "sdpa_kernels": kernels, "loss": metrics.loss, "grad_norm": metrics.grad_norm,
        "peak_allocated_gib": peak_gib,
    }


# -- stages ------------------------------------------------------------------------------------------


def stage_env(ctx: Context) -> dict:
    import megatron.core
    import transformers

    def version(name: str) -> str | None:
        """The package's version; None when it is not installed; why not when it does not import."""
        if importlib.util.find_spec(name) is None:
            return None
        try:
            return importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - TE also fails with its own CUDA/cuDNN load errors
            return f"not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"

    return {
        "mode": "cpu-tiny" if ctx.args.cpu_tiny else "gpu", "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
        "transformers": transformers.__version__, "transformer_engine": version("transformer_engine"),
        "vllm_installed": importlib.util.find_spec("vllm") is not None,  # importing it here would cost seconds
        "device": torch.cuda.get_device_name() if ctx.on_gpu else f"CPU ({os.cpu_count()} cores)",
        "capability": list(torch.cuda.get_device_capability()) if ctx.on_gpu else None,
        "recipe": ctx.recipe.name, "threads": torch.get_num_threads(),
    }


def stage_attention(ctx: Context) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_hbpo.megatron.attention import SdpaAttention, sdpa_kernels_used, shared_prefix_mask
    from megatron_hbpo.megatron.model import transformer_config

    recipe, mode = ctx.recipe, ctx.args.mode
    config = transformer_config(ctx.hf_config, recipe.model, recipe.parallel, use_te=False)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    modules = {"sdpa": SdpaAttention(**kwargs), "unfused": DotProductAttention(**kwargs)}
    s = mode.prompt + mode.response
    b = max(1, recipe.train.micro_batch_tokens // s)
    m = recipe.model
    device = torch.cuda.current_device() if ctx.on_gpu else "cpu"
    dtype = torch.bfloat16 if m.params_dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, m.num_attention_heads, recipe.head_dim, generator=g).to(device)
    k, v = (torch.randn(s, b, m.num_query_groups, recipe.head_dim, generator=g).to(device) for _ in range(2))
    causal = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(1)
    quarter = mode.response // 4
    tree = shared_prefix_mask(mode.prompt, [quarter] * 4, s)[0][None, None].to(device)

    def run(name: str, mask: torch.Tensor, reference: bool = False) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            qq, kk, vv = (t.detach().to(torch.float32 if reference else dtype).requires_grad_() for t in (q, k, v))
            out = modules[name](qq, kk, vv, mask)
            out.float().square().mean().backward()
            return out.detach().float()
        return fn

    def seconds(fn: Callable, reps: int) -> float:
        fn()
        ctx.sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        ctx.sync()
        return (time.perf_counter() - start) / reps

    reps = 5 if ctx.on_gpu else 3
    result = {"shape": {"batch": b, "seq": s, "heads": m.num_attention_heads, "kv_heads": m.num_query_groups,
                        "head_dim": recipe.head_dim, "dtype": str(dtype).removeprefix("torch.")},
              "kernels_causal": sdpa_kernels_used(run("sdpa", causal)),
              "kernels_tree": sdpa_kernels_used(run("sdpa", tree))}
    result["sdpa_causal_ms"] = 1e3 * seconds(run("sdpa", causal), reps)
    result["sdpa_tree_ms"] = 1e3 * seconds(run("sdpa", tree), reps)
    result["unfused_causal_ms"] = 1e3 * seconds(run("unfused", causal), reps)
    result["unfused_over_sdpa"] = result["unfused_causal_ms"] / result["sdpa_causal_ms"]
    for name, mask in (("causal", causal), ("tree", tree)):
        # SDPA in fp32 equals the unfused path to 1e-6 (tests/test_attention.py): the reference.
        reference = run("sdpa", mask, reference=True)()
        for backend in modules:
            result[f"{backend}_max_error_{name}"] = float((run(backend, mask)() - reference).abs().max())
    if ctx.on_gpu:  # the fast path must be able to run on flash alone
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                run("sdpa", causal)()
            result["causal_runs_on_flash_alone"] = True
        except RuntimeError as error:
            result["causal_runs_on_flash_alone"] = False
            result["flash_error"] = str(error).splitlines()[0]
    return result


def stage_train(ctx: Context) -> dict:
    ctx.policy = build_policy(ctx.recipe, ctx.hf_config)
    result = measure_update(ctx, ctx.policy, ctx.recipe)
    result["over_hf_baseline"] = ctx.relative_speed(result["tokens_per_s"], "hf_baseline")
    return result


def stage_logp(ctx: Context) -> dict:
    if ctx.policy is None:
        raise Skip("the train stage built no policy")
    tokens = sum(len(s.tokens) for s in ctx.sequences)
    ctx.policy.logprobs(ctx.sequences, temperature=1.0)
    ctx.sync()
    start = time.perf_counter()
    for _ in range(ctx.args.steps):
        ctx.policy.logprobs(ctx.sequences, temperature=1.0)
    ctx.sync()
    seconds = time.perf_counter() - start
    return {"sequences": len(ctx.sequences), "tokens_per_pass": tokens, "passes": ctx.args.steps,
            "seconds_per_pass": seconds / ctx.args.steps, "tokens_per_s": tokens * ctx.args.steps / seconds}


def stage_plan(ctx: Context) -> dict:
    from megatron_hbpo.plan import RUNTIME_OVERHEAD_GIB, plan

    recipe = ctx.recipe
    if not ctx.on_gpu:  # the planner sizes GPUs only; the prediction is still computed
        recipe = copy.deepcopy(recipe)
        recipe.cluster.gpu = "H100-80GB"
    predicted = plan(recipe)
    measured = ctx.value("train", "peak_allocated_gib")
    allocated = predicted.train_gib - RUNTIME_OVERHEAD_GIB  # the CUDA context is not in the allocator's count
    return {"gpu": recipe.cluster.gpu, "micro_batch_tokens": recipe.train.micro_batch_tokens,
            "predicted_train_gib": predicted.train_gib, "predicted_allocated_gib": allocated,
            "parts_gib": {"weights": predicted.weights_gib, "grads": predicted.grads_gib,
                          "optimizer": predicted.optimizer_gib, "activations": predicted.activations_gib,
                          "logits": predicted.logits_gib},
            "measured_peak_allocated_gib": measured,
            "predicted_over_measured": allocated / measured if measured else None,
            "note": None if measured else "no CUDA allocator on CPU: nothing measured to compare with"}


def stage_export(ctx: Context) -> dict:
    from megatron_hbpo.convert.export import HFExportStream

    if ctx.policy is None:
        raise Skip("the train stage built no policy")
    results = {}
    for label, to_host in (("device", False), ("host", True)):
        stream = HFExportStream(ctx.policy.model[0], ctx.hf_config, bucket_bytes=256 << 20)
        produced = 0
        ctx.sync()
        start = time.perf_counter()
        for bucket in stream:
            for _, tensor in bucket:
                produced_tensor = tensor.to("cpu") if to_host else tensor
                produced += produced_tensor.numel() * produced_tensor.element_size()
        ctx.sync()
        seconds = time.perf_counter() - start
        results[f"{label}_gb_per_s"] = produced / seconds / 1e9
        results[f"{label}_seconds"] = seconds
        results["gb"] = produced / 1e9
        results["peak_stream_bytes"] = stream.peak_bytes
    return results


def _id_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer whose tokens are the ids themselves ("t0", "t1", ...): vLLM needs one to
    start; the check feeds and reads token ids only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t0", unk_token="t0")


def stage_vllm(ctx: Context) -> dict:
    if importlib.util.find_spec("vllm") is None:
        raise Skip("vllm is not installed")
    if ctx.policy is None:
        raise Skip("the train stage built no policy")
    from megatron_hbpo.algo.mismatch import logprob_mismatch
    from megatron_hbpo.convert.export import HFExportStream
    from megatron_hbpo.megatron.batching import PolicySequence
    from megatron_hbpo.rollout.engine import Request, SamplingSettings
    from megatron_hbpo.rollout.vllm_engine import VLLMEngine
    from megatron_hbpo.train import write_rollout_model

    recipe, mode, policy = ctx.recipe, ctx.args.mode, ctx.policy
    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        model_dir = Path(tmp) / "rollout_model"
        hf_config = copy.deepcopy(ctx.hf_config)
        tokenizer = _id_tokenizer(hf_config.vocab_size)
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            setattr(hf_config, key, 0)
        write_rollout_model(policy, hf_config, tokenizer, model_dir)
        start = time.perf_counter()
        engine = VLLMEngine(model_dir, seed=0, dtype="bfloat16" if recipe.model.params_dtype == "bf16" else "float32",
                            max_model_len=mode.prompt + mode.response + 16,
                            gpu_memory_utilization=0.3, enforce_eager=True)
        startup = time.perf_counter() - start
        policy.train_step(ctx.sequences, step_loss(recipe))  # the engine now holds the weights before this step
        ctx.sync()
        start = time.perf_counter()
        engine.update_weights(HFExportStream(policy.model[0], hf_config, bucket_bytes=256 << 20))
        ctx.sync()
        refit = time.perf_counter() - start
        max_tokens = min(mode.response, 256)
        settings = SamplingSettings(temperature=recipe.rollout.temperature, top_p=1.0, max_tokens=max_tokens)
        prompts = [seq.tokens[:mode.prompt] for seq in ctx.sequences[:4]]
        start = time.perf_counter()
        samples = engine.generate([Request(p, n=2, budget=None, sampling=settings, group_id=i)
                                   for i, p in enumerate(prompts)])
        generate = time.perf_counter() - start
        samples = [x for x in samples if x.response_ids]
        trained = policy.logprobs([PolicySequence(x.prompt_ids + x.response_ids, len(x.prompt_ids)) for x in samples],
                                  temperature=1.0)
        mismatch = logprob_mismatch(torch.cat([x.logprobs for x in samples]), torch.cat(trained))
        engine.sleep()
        del engine
        gc.collect()
    return {"startup_s": startup, "refit_s": refit, "refit_gb": sum(
        p.numel() * p.element_size() for p in policy.model[0].parameters()) / 1e9,
        "generated_tokens": mismatch["tokens"], "generate_tokens_per_s": mismatch["tokens"] / generate,
        "mismatch_mean_abs": mismatch["mean_abs"], "mismatch_max_abs": mismatch["max_abs"],
        "dtype": recipe.model.params_dtype}


def stage_hf_baseline(ctx: Context) -> dict:
    from transformers import Qwen2ForCausalLM

    recipe = ctx.recipe
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if recipe.model.params_dtype == "bf16" else torch.float32
    with device:
        model = Qwen2ForCausalLM._from_config(copy.deepcopy(ctx.hf_config), attn_implementation="sdpa", dtype=dtype)
    model.train()
    if recipe.parallel.recompute_granularity == "full":
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optimizer.lr,
                                  weight_decay=recipe.optimizer.weight_decay, fused=ctx.on_gpu)
    sequences = ctx.sequences
    total = sum(s.response_length for s in sequences)

    def step() -> float:
        loss_value = 0.0
        for seq in sequences:  # one sequence per micro-batch: the whole batch's logits would not fit
            tokens = torch.tensor(seq.tokens, device=device)[None]
            logits = model(input_ids=tokens).logits[0, :-1].float()
            logp = -torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
            loss = -(logp[seq.prompt_length - 1:] * seq.advantage).sum() / total
            loss.backward()
            loss_value += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value

    step()
    ctx.sync()
    start = time.perf_counter()
    for _ in range(ctx.args.steps):
        step()
    ctx.sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(s.tokens) for s in sequences)
    flops = sum(model_flops_per_sequence(recipe, len(s.tokens)) for s in sequences)
    peak, meaningful = ctx.peak_flops
    return {"tokens_per_s": tokens * ctx.args.steps / seconds, "seconds_per_step": seconds / ctx.args.steps,
            "mfu": flops * ctx.args.steps / seconds / peak, "mfu_meaningful": meaningful,
            "gradient_checkpointing": recipe.parallel.recompute_granularity == "full",
            "sequences_per_micro_batch": 1}


def _te_available(ctx: Context) -> None:
    if not ctx.on_gpu:
        raise Skip("Transformer Engine needs CUDA")
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as error:  # noqa: BLE001 - an ImportError or TE's own CUDA/cuDNN load errors
        raise Skip(f"transformer_engine not importable ({type(error).__name__}: "
                   f"{str(error).splitlines()[0][:100]})") from None


def _te_stage(ctx: Context, extra: list[str]) -> dict:
    free(ctx)
    recipe = load_layout(ctx.args.mode, ctx.args, ctx.on_gpu,
                         ["model.transformer_impl=transformer_engine", "model.attention_backend=te", *extra])
    policy = build_policy(recipe, ctx.hf_config)
    try:
        result = measure_update(ctx, policy, recipe)
    finally:
        del policy
        free(ctx)
    result["over_sdpa_stage"] = ctx.relative_speed(result["tokens_per_s"], "train")
    return result


def stage_te(ctx: Context) -> dict:
    _te_available(ctx)
    return _te_stage(ctx, [])


def stage_te_fp8(ctx: Context) -> dict:
    _te_available(ctx)
    if torch.cuda.get_device_capability() < (8, 9):
        raise Skip(f"FP8 needs compute capability 8.9+, this GPU has {torch.cuda.get_device_capability()}")
    return _te_stage(ctx, ["model.fp8=delayed"])


# transformers first, on an empty GPU; vLLM after the stages that time on CPU threads (it takes one of
# two for serving) and before Transformer Engine's, which need the policy's memory.
STAGES: list[tuple[str, Callable[[Context], dict]]] = [
    ("env", stage_env), ("attention", stage_attention), ("hf_baseline", stage_hf_baseline), ("train", stage_train),
    ("logp", stage_logp), ("plan", stage_plan), ("export", stage_export), ("vllm", stage_vllm),
    ("te", stage_te), ("te_fp8", stage_te_fp8),
]


# -- running and reporting ---------------------------------------------------------------------------


def summary(name: str, r: dict) -> str:
    """One line of the table for a stage's result."""
    if r.get("status") != "ok":
        return r.get("reason") or r.get("error", "")

    def mfu(x: dict) -> str:
        return f"MFU {x['mfu']:.1%}" + ("" if x["mfu_meaningful"] else " (meaningless: CPU against an H100 peak)")

    if name == "env":
        return f"{r['device']}, torch {r['torch']}, megatron-core {r['megatron_core']}, TE {r['transformer_engine']}"
    if name == "attention":
        return (f"kernels causal {r['kernels_causal']} tree {r['kernels_tree']}; unfused takes "
                f"{r['unfused_over_sdpa']:.2f}x sdpa's time; max error vs fp32 sdpa {r['sdpa_max_error_causal']:.1e}, "
                f"unfused {r['unfused_max_error_causal']:.1e}")
    if name in ("train", "te", "te_fp8"):
        line = f"{r['tokens_per_s']:,.0f} tokens/s, {mfu(r)}, kernels {r['sdpa_kernels'] or '-'}"
        if r.get("peak_allocated_gib") is not None:
            line += f", peak {r['peak_allocated_gib']:.1f} GiB"
        for key, label in (("over_hf_baseline", "transformers"), ("over_sdpa_stage", "the SDPA step")):
            if r.get(key):
                line += f"; {r[key]:.2f}x {label}"
        return line
    if name == "logp":
        return f"{r['tokens_per_s']:,.0f} tokens/s"
    if name == "plan":
        if r["predicted_over_measured"] is None:
            return f"predicted {r['predicted_allocated_gib']:.2f} GiB allocated; {r['note']}"
        return (f"predicted {r['predicted_allocated_gib']:.1f} GiB vs measured {r['measured_peak_allocated_gib']:.1f} "
                f"GiB: ratio {r['predicted_over_measured']:.2f}")
    if name == "export":
        return f"{r['device_gb_per_s']:.1f} GB/s on device, {r['host_gb_per_s']:.2f} GB/s to host ({r['gb']:.2f} GB)"
    if name == "vllm":
        return (f"refit {r['refit_s']:.2f} s, mismatch mean {r['mismatch_mean_abs']:.1e} max "
                f"{r['mismatch_max_abs']:.1e} over {r['generated_tokens']} tokens")
    if name == "hf_baseline":
        return f"{r['tokens_per_s']:,.0f} tokens/s, {mfu(r)}"
    return ""


def run(ctx: Context, only: list[str] | None) -> int:
    from megatron_hbpo.atomic import write_json

    deadline = time.monotonic() + ctx.args.time_limit
    for name, fn in STAGES:
        if only and name not in only and name != "env":
            continue
        start = time.perf_counter()
        if time.monotonic() > deadline:
            result = {"status": "skipped", "reason": f"time limit of {ctx.args.time_limit:.0f} s reached"}
        else:
            try:
                result = {"status": "ok", **fn(ctx)}
            except Skip as reason:
                result = {"status": "skipped", "reason": str(reason)}
            except Exception as error:  # noqa: BLE001 - one failing stage must not hide the others
                result = {"status": "error", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}",
                          "traceback": traceback.format_exc()}
        if result["status"] == "error":  # what the failed stage held is garbage once its traceback is gone
            gc.collect()
            if ctx.on_gpu:
                torch.cuda.empty_cache()
        result["seconds"] = time.perf_counter() - start
        ctx.results[name] = result
        write_json(ctx.out / f"{name}.json", {"stage": name, **result})
        print(f"[{name}] {result['status']} in {result['seconds']:.1f} s: {summary(name, result)}", flush=True)
    rows = [(name, r["status"], summary(name, r)) for name, r in ctx.results.items()]
    width = max(len(n) for n, _, _ in rows)
    print(f"\n{'stage'.ljust(width)}  status   result", flush=True)
    for name, status, text in rows:
        print(f"{name.ljust(width)}  {status.ljust(7)}  {text}", flush=True)
    print(f"(JSON per stage in {ctx.out})", flush=True)
    return 1 if any(r["status"] == "error" for r in ctx.results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="directory for the per-stage JSON files")
    parser.add_argument("--cpu-tiny", action="store_true", help="every stage on a tiny model on CPU (CI)")
    parser.add_argument("--sequences", type=int, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--micro-batch-tokens", type=int, help="override train.micro_batch_tokens")
    parser.add_argument("--time-limit", type=float, default=170.0,
                        help="seconds after which the remaining stages are skipped")
    parser.add_argument("--only", nargs="+", help="run these stages (and env) only")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu_tiny
    if not on_gpu and not args.cpu_tiny:
        print("no CUDA device: use --cpu-tiny for the CPU run of the same stages", file=sys.stderr)
        return 2
    if args.cpu_tiny and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny matrices: on a shared CPU more threads only wait for each other
    args.mode = TINY if args.cpu_tiny else FULL
    args.sequences = args.sequences or args.mode.sequences
    args.steps = args.steps or args.mode.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.model import hf_config_from_recipe

    ctx = Context(args=args, out=out, on_gpu=on_gpu)
    ctx.recipe = load_layout(args.mode, args, on_gpu)
    ctx.hf_config = hf_config_from_recipe(ctx.recipe.model)
    ctx.sequences = fixed_sequences(args.sequences, args.mode.prompt, args.mode.response, ctx.recipe.model.vocab_size)
    parallel.initialize(ctx.recipe.parallel, ctx.recipe.train.seed)
    return run(ctx, args.only)


if __name__ == "__main__":
    sys.exit(main())
