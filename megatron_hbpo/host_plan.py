"""Host-memory plan of a CPU recipe (cluster.gpu: cpu), what `python -m megatron_hbpo.plan` prints for it.

On CPU a "GPU" is one process and everything lives in host memory. Per process, in GiB:
  weights, grads, optimizer   as plan.py computes them per GPU (the same Megatron state)
  activations, logits         plan.py's figures, which count bf16 activations, scaled to fp32 for
                              fp32 params (x2 and x1.2: logits keep an fp32 copy either way)
  runtime                     what torch, Megatron-Core and vLLM hold in a process before any model
                              (measured: `make run`'s one process peaks at 1.05 GiB, of which the KV
                              cache is 0.25 and the model nothing)
Every process also runs a rollout engine (rollout/layout.py): its share of the weights at the
engine's dtype (1 / rollout.tensor_parallel_size), the KV cache (VLLMEngine's CPU default), and
during a refit one bucket (rollout.refit_bucket_mb, or the whole model when smaller) plus the largest
tensor (the embedding), which the streamed refit holds at most. The first process of each rollout
replica starts `verifier.num_workers` math-verify workers (about 0.06 GiB each, measured).
The node total is checked against this machine's physical memory. Estimates from these counts,
not measurements of the recipe.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

from megatron_hbpo.config import Recipe
from megatron_hbpo.plan import GIB, Plan, plan

RUNTIME_GIB = 0.8  # 1.05 GiB peak of tiny_cpu's process minus its 0.25 GiB KV cache (2026-12-01)
VERIFIER_WORKER_GIB = 0.06  # a math-verify worker with sympy loaded (measured RSS 45-60 MB)


@dataclass
class HostPlan:
    gpu_plan: Plan  # the per-process Megatron figures (plan.py), GPU-specific parts unused
    activations_gib: float
    logits_gib: float
    train_gib: float  # per process: weights + grads + optimizer + activations + logits + runtime
    engine_weights_gib: float  # per engine: the weights / rollout.tensor_parallel_size
    kv_cache_gib: float
    refit_gib: float  # per engine, during a refit: one bucket + the largest tensor
    engines_per_node: int
    verifier_gib: float  # per replica (its first process)
    node_gib: float
    machine_gib: float
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems


def _cpu_kv_cache_bytes() -> int:
    from megatron_hbpo.rollout.vllm_engine import VLLMEngine

    return int(inspect.signature(VLLMEngine).parameters["cpu_kv_cache_bytes"].default)


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def host_plan(recipe: Recipe, machine_gib: float | None = None) -> HostPlan:
    m, c = recipe.model, recipe.cluster
    # plan() sizes a GPU; the Megatron state it counts is the same on CPU, only its memory checks differ.
    base = plan(dataclasses.replace(recipe, cluster=dataclasses.replace(c, gpu="H100-80GB")))
    fp32 = m.params_dtype == "fp32"
    activations = base.activations_gib * (2.0 if fp32 else 1.0)
    logits = base.logits_gib * (1.2 if fp32 else 1.0)
    train = base.weights_gib + base.grads_gib + base.optimizer_gib + activations + logits + RUNTIME_GIB
    width = 4 if fp32 else 2
    t = recipe.rollout.tensor_parallel_size
    engine_weights = base.params_total * width / t / GIB
    kv_cache = _cpu_kv_cache_bytes() / GIB
    # A bucket never holds more than the model; the largest tensor is the (unpadded) embedding.
    refit = min((recipe.rollout.refit_bucket_mb << 20) / GIB, base.params_total * width / GIB) \
        + m.vocab_size * m.hidden_size * width / GIB
    engines = c.gpus_per_node  # one per process
    verifier = recipe.verifier.num_workers * VERIFIER_WORKER_GIB
    node = c.gpus_per_node * train + c.gpus_per_node // t * verifier + engines * (engine_weights + kv_cache + refit)
    machine = machine_memory_gib() if machine_gib is None else machine_gib
    problems = []
    if node > machine:
        problems.append(f"a node needs {node:.1f} GiB of this machine's {machine:.1f}; lower cluster.gpus_per_node "
                        "(processes) or train.micro_batch_tokens, or raise parallel.tensor_model_parallel_size")
    return HostPlan(gpu_plan=base, activations_gib=activations, logits_gib=logits, train_gib=train,
                    engine_weights_gib=engine_weights, kv_cache_gib=kv_cache, refit_gib=refit, engines_per_node=engines,
                    verifier_gib=verifier, node_gib=node, machine_gib=machine, problems=problems)


def report(result: HostPlan, recipe: Recipe) -> str:
    base, p, c = result.gpu_plan, recipe.parallel, recipe.cluster
    lines = [
        f"{recipe.name}: {base.params_total / 1e6:.2f}M params on {c.nodes} node(s) x {c.gpus_per_node} CPU "
        f"process(es) (TP {p.tensor_model_parallel_size}, PP {p.pipeline_model_parallel_size}, CP "
        f"{p.context_parallel_size}, DP {recipe.data_parallel_size}); host memory, {recipe.model.params_dtype}",
        f"  per process: weights {base.weights_gib:.3f} GiB, grads {base.grads_gib:.3f}, optimizer "
        f"{base.optimizer_gib:.3f}, activations {result.activations_gib:.3f}, logits {result.logits_gib:.3f}, "
        f"runtime {RUNTIME_GIB:.2f} (torch, Megatron, vLLM) = {result.train_gib:.2f} GiB",
        f"  rollout engine in every process ({recipe.rollout_layout.describe()}): weights "
        f"{result.engine_weights_gib:.3f} GiB, KV cache {result.kv_cache_gib:.2f} GiB, refit buffer "
        f"{result.refit_gib:.3f} GiB; verifier {recipe.verifier.num_workers} x {VERIFIER_WORKER_GIB:.2f} GiB "
        "per replica",
        f"  per node {result.node_gib:.1f} GiB of this machine's {result.machine_gib:.1f} GiB",
        "  step: " + ", ".join(f"{k} {v * 1e3:,.2f} GFLOP" for k, v in base.step_tflops.items()),
    ]
    lines += [f"  DOES NOT FIT: {problem}" for problem in result.problems] or ["  fits"]
    return "\n".join(lines)
