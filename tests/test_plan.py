"""The fit planner: every GPU recipe fits by its own plan; the numbers match a hand computation."""

import subprocess
import sys

import pytest

from megatron_hbpo.config import ClusterConfig, ModelConfig, OptimizerConfig, ParallelConfig, Recipe, TrainConfig, \
    load_recipe, validate
from megatron_hbpo.plan import GIB, plan
from conftest import REPO

GPU_RECIPES = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if load_recipe(p).cluster.gpu != "cpu"]


def test_there_are_recipes_from_1p5b_to_70b():
    sizes = sorted(plan(load_recipe(p)).params_total / 1e9 for p in GPU_RECIPES)
    assert sizes[0] < 2 and sizes[-1] > 70 and len(GPU_RECIPES) >= 5


@pytest.mark.parametrize("path", GPU_RECIPES, ids=[p.stem for p in GPU_RECIPES])
def test_every_gpu_recipe_fits_its_own_plan(path):
    result = plan(load_recipe(path))
    assert result.fits, result.problems
    assert result.kv_cache_tokens >= 5120 and result.step_tflops["total"] > 0


def test_hand_computed_small_case():
    recipe = validate(Recipe(
        name="hand", model=ModelConfig(family="llama", num_layers=4, hidden_size=1024, ffn_hidden_size=4096,
                                       num_attention_heads=8, num_query_groups=2, vocab_size=1000,
                                       max_position_embeddings=8192, params_dtype="bf16"),
        parallel=ParallelConfig(tensor_model_parallel_size=2), cluster=ClusterConfig(gpus_per_node=8),
        train=TrainConfig(prompts_per_step=16, mini_batch_prompts=4, micro_batch_tokens=8192),
        optimizer=OptimizerConfig(use_distributed_optimizer=True)))
    result = plan(recipe)
    # Per layer: qkv 1024 x (8 + 2 x 2) x 128, proj 8 x 128 x 1024, SwiGLU 3 x 1024 x 4096, 2 norms.
    per_layer = 1024 * 12 * 128 + 1024 * 1024 + 3 * 1024 * 4096 + 2 * 1024
    assert per_layer == 15_206_400
    # Vocabulary padded to 1024; untied input and output embeddings; final norm.
    assert result.params_total == 4 * per_layer + 2 * 1024 * 1024 + 1024
    per_gpu = 4 * per_layer // 2 + 1024 * 1024 // 2 * 2 + 1024
    assert result.params_per_gpu == per_gpu
    assert result.weights_gib == pytest.approx(per_gpu * 2 / GIB)
    assert result.grads_gib == pytest.approx(per_gpu * 4 / GIB)
    assert result.optimizer_gib == pytest.approx(per_gpu * 12 / 4 / GIB)  # DP 4 shards
    # No sequence parallelism: 8h bytes replicated, (4h + 4 g d + 6 f) split over TP 2, per token and layer.
    per_token_layer = 8 * 1024 + (4 * 1024 + 4 * 2 * 128 + 6 * 4096) / 2
    assert result.activations_gib == pytest.approx(8192 * per_token_layer * 4 / GIB)
    assert result.logits_gib == pytest.approx(8192 * 1024 / 2 * 10 / GIB)
    assert result.train_gib == pytest.approx(result.weights_gib + result.grads_gib + result.optimizer_gib
                                             + result.activations_gib + result.logits_gib + 2.0)


def test_a_recipe_that_does_not_fit_names_the_knob():
    too_big = plan(load_recipe(REPO / "recipes" / "r1_distill_qwen_32b.yaml", ["rollout.gpu_memory_utilization=0.5"]))
    assert not too_big.fits and "lower rollout.gpu_memory_utilization" in too_big.problems[0]
    long_batches = plan(load_recipe(REPO / "recipes" / "r1_distill_qwen_1p5b.yaml", ["train.micro_batch_tokens=65536"]))
    assert not long_batches.fits and "parallel.recompute_granularity=full" in long_batches.problems[0]


def test_cli_exit_codes():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "megatron_hbpo.plan", "--config", *args], capture_output=True,
                              text=True, cwd=REPO)

    ok = run("recipes/r1_distill_llama_70b.yaml")
    assert ok.returncode == 0 and "fits" in ok.stdout and "TFLOP" in ok.stdout
    assert run("recipes/r1_distill_qwen_32b.yaml", "rollout.gpu_memory_utilization=0.5").returncode == 1
    bad = run("recipes/tiny_cpu.yaml", "cluster.gpu=A100")
    assert bad.returncode == 2 and "cluster.gpu" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cpu_recipe_gets_a_host_memory_plan():
    from megatron_hbpo.host_plan import RUNTIME_GIB, VERIFIER_WORKER_GIB, host_plan

    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", ["cluster.gpus_per_node=2"])
    gpu = plan(load_recipe(REPO / "recipes" / "tiny_cpu.yaml", ["cluster.gpus_per_node=2", "cluster.gpu=H100-80GB"]))
    host = host_plan(recipe, machine_gib=64.0)
    assert host.fits and host.gpu_plan.weights_gib == gpu.weights_gib and host.gpu_plan.optimizer_gib == gpu.optimizer_gib
    assert host.activations_gib == pytest.approx(2 * gpu.activations_gib)  # fp32 activations, the plan counts bf16
    assert host.train_gib == pytest.approx(gpu.weights_gib + gpu.grads_gib + gpu.optimizer_gib + host.activations_gib
                                           + host.logits_gib + RUNTIME_GIB)
    # Two processes, each an engine (two replicas of T=1): fp32 weights, a KV cache and the refit's
    # bucket + embedding each; a verifier per replica.
    assert host.engines_per_node == 2 and host.kv_cache_gib > 0
    assert host.engine_weights_gib == pytest.approx(gpu.params_total * 4 / GIB)
    assert host.refit_gib == pytest.approx((gpu.params_total + 128 * 128) * 4 / GIB)  # bucket > model: the model
    assert host.node_gib == pytest.approx(2 * (host.train_gib + 2 * VERIFIER_WORKER_GIB)
                                          + 2 * (host.engine_weights_gib + host.kv_cache_gib + host.refit_gib))
    # One replica of T=2: half the weights per engine, one verifier.
    one = host_plan(load_recipe(REPO / "recipes" / "tiny_cpu.yaml", ["cluster.gpus_per_node=2",
                                                                      "rollout.tensor_parallel_size=2"]), machine_gib=64.0)
    assert one.engine_weights_gib == pytest.approx(host.engine_weights_gib / 2)
    assert one.node_gib == pytest.approx(host.node_gib - 2 * VERIFIER_WORKER_GIB - host.engine_weights_gib)
    small = host_plan(recipe, machine_gib=1.0)
    assert not small.fits and "lower cluster.gpus_per_node" in small.problems[0]


def test_cpu_plan_cli():
    proc = subprocess.run([sys.executable, "-m", "megatron_hbpo.plan", "--config", "recipes/tiny_cpu.yaml"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "host memory" in proc.stdout and "KV cache" in proc.stdout and proc.stdout.rstrip().endswith("fits")
