"""Recipe loading, `extends:`, dotted overrides, and one-line validation errors naming the field."""

import subprocess
import sys

import pytest

from megatron_hbpo.config import ConfigError, load_recipe
from conftest import REPO

TINY = REPO / "recipes" / "tiny_cpu.yaml"


def test_tiny_cpu_validates_with_the_papers_algorithm_defaults():
    r = load_recipe(TINY)
    assert r.algo.budgets == [16, 32, 48, 64] and r.rollout.max_response_length == 96
    # Fields the recipe leaves alone keep the paper's values (docs/method.md).
    assert (r.algo.beta, r.algo.w_intra, r.algo.format_error_reward) == (4.0, 1.0, 0.0)
    assert (r.algo.clip_eps_low, r.algo.clip_eps_high, r.algo.dual_clip_c) == (0.2, 0.28, 3.0)
    assert r.algo.budget_template == " I will answer the question within {budget} tokens"
    assert r.data_parallel_size == 1 and r.head_dim == 32


def test_every_recipe_in_the_repo_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_extends_and_overrides(tmp_path):
    grpo = load_recipe(REPO / "recipes" / "tiny_cpu_grpo.yaml")
    assert grpo.algo.name == "grpo" and grpo.algo.budgets == [] and grpo.model.hidden_size == 128
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {TINY}\nname: child\nrollout:\n  n_rollouts: 4\n")
    r = load_recipe(child, ["algo.budgets=[16,32]", "optimizer.lr=1e-6", "algo.center_intra=true"])
    assert r.name == "child" and r.rollout.n_rollouts == 4 and r.rollout.max_response_length == 96
    assert r.algo.budgets == [16, 32] and r.optimizer.lr == 1e-6 and r.algo.center_intra is True


def test_multi_level_and_list_extends(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {TINY}\ntrain:\n  seed: 7\n")
    (tmp_path / "b.yaml").write_text("train:\n  seed: 8\n  total_steps: 3\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\nname: c\n")
    r = load_recipe(tmp_path / "c.yaml")
    assert (r.train.seed, r.train.total_steps, r.model.num_layers) == (8, 3, 2)


BAD = [
    # (overrides, field named in the error, words of the fix)
    (["algo.budgts=[16,32]"], "algo.budgts", "did you mean 'algo.budgets'"),
    (["algoo.budgets=[16]"], "algoo", "did you mean 'algo'"),
    (["rollout.n_rollouts=abc"], "rollout.n_rollouts", "expected an integer"),
    (["rollout.n_rollouts=8.5"], "rollout.n_rollouts", "expected an integer"),
    (["algo.center_intra=1"], "algo.center_intra", "expected true/false"),
    (["algo.budgets=[16,x]"], "algo.budgets[1]", "expected an integer"),
    (["algo.name=hbp"], "algo.name", "did you mean 'hbpo'"),
    (["rollout.n_rollouts=6"], "rollout.n_rollouts", "multiple of 4"),
    (["algo.budgets=[32,16,48,64]"], "algo.budgets", "strictly increasing"),
    (["algo.budgets=[16,16,48,64]"], "algo.budgets", "strictly increasing"),
    (["algo.budgets=[16,32,48,96]"], "algo.budgets", "below rollout.max_response_length"),
    (["algo.budgets=[]"], "algo.budgets", "at least one budget"),
    (["algo.name=grpo"], "algo.budgets", "algo.budgets=[]"),
    (["algo.budget_template=' within tokens'"], "algo.budget_template", "{budget}"),
    (["parallel.tensor_model_parallel_size=3", "cluster.gpus_per_node=3"], "parallel.tensor_model_parallel_size",
     "num_attention_heads=4"),
    (["parallel.tensor_model_parallel_size=4", "cluster.gpus_per_node=4"], "parallel.tensor_model_parallel_size",
     "num_query_groups=2"),
    (["parallel.pipeline_model_parallel_size=3", "cluster.gpus_per_node=3"], "parallel.pipeline_model_parallel_size",
     "num_layers=2"),
    (["parallel.tensor_model_parallel_size=2"], "parallel", "does not divide the world size 1"),
    (["model.num_query_groups=3"], "model.num_query_groups", "num_attention_heads=4"),
    (["rollout.max_response_length=200"], "rollout.max_response_length", "max_position_embeddings=256"),
    (["train.mini_batch_prompts=5"], "train.mini_batch_prompts", "prompts_per_step=16"),
    (["cluster.gpus_per_node=2", "train.mini_batch_prompts=1", "train.prompts_per_step=4"],
     "train.mini_batch_prompts", "multiple of 2"),
    (["rollout.top_p=0"], "rollout.top_p", "(0, 1]"),
    (["algo.dual_clip_c=1"], "algo.dual_clip_c", "> 1"),
    (["optimizer.lr=0"], "optimizer.lr", "> 0"),
    (["verifier.timeout_s=0"], "verifier.timeout_s", "> 0"),
    (["train.micro_batch_tokens=100"], "train.micro_batch_tokens", "raise it"),
    (["model.num_layers=null"], "model.num_layers", "expected an integer"),
    (["model.fp8=delayed", "model.transformer_impl=local", "model.params_dtype=bf16"], "model.fp8",
     "Transformer Engine"),
    (["model.fp8=current"], "model.fp8", "params_dtype=bf16"),
    (["model.fp8=e5m2"], "model.fp8", "'delayed' | 'current'"),
    (["model.fp8=delayed", "model.params_dtype=bf16"], "model.fp8_bf16_layers", "no FP8 layer"),
    (["model.rope_scaling={rope_type: yarn, factor: 4}"], "model.rope_scaling", "llama3"),
    (["algo=3"], "algo", "expected a section"),
    (["noequals"], "noequals", "section.field=value"),
    (["algo.alpha.x=1"], "algo.alpha", "is a value, not a section"),
    (["algo.beta.x=1"], "algo.beta", "expected a number"),
]


@pytest.mark.parametrize("overrides, field_name, fix", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_gives_one_line_error_naming_the_field(overrides, field_name, fix):
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert f"{field_name}:" in message or f"{field_name} " in message or f"'{field_name}" in message, message
    assert fix in message, message


def test_world_size_of_the_launch_must_match_the_recipe():
    load_recipe(TINY, world_size=1)
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_node: .*WORLD_SIZE=2"):
        load_recipe(TINY, world_size=2)


def test_model_architecture_is_required(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel:\n  family: llama\n")
    with pytest.raises(ConfigError, match=r"model.num_layers: required field is missing"):
        load_recipe(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "loop_a.yaml").write_text("extends: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("extends: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "loop_a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="'nowhere.yaml' not found"):
        load_recipe(tmp_path / "orphan.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_recipe(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_recipe(tmp_path / "list.yaml")


def test_cli_prints_resolved_recipe_or_one_line_error():
    ok = subprocess.run([sys.executable, "-m", "megatron_hbpo.config", "--config", str(TINY), "algo.w_intra=2"],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "w_intra: 2.0" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megatron_hbpo.config", "--config", str(TINY), "rollout.n_rollouts=7"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "rollout.n_rollouts" in bad.stderr


@pytest.mark.parametrize("override, field_name", [
    ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size"),
    ("cluster.nodes=3", "parallel"),
    ("algo.budgets=[512,1024,2048,4096]", "algo.budgets"),
])
def test_broken_cluster_recipe_names_the_field(override, field_name):
    with pytest.raises(ConfigError, match=rf"{field_name}:"):
        load_recipe(REPO / "recipes" / "r1_distill_llama_70b.yaml", [override])


# -- the baselines' sections (docs/baselines.md, "Settings") ----------------------------------------------------

RECIPES = REPO / "recipes"
BASELINE_BAD = [
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.alpha=-1e-4"], "algo.l1.alpha", ">= 0"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.alpha_max=0"], "algo.l1.alpha_max", "slope"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.delta=1.5"], "algo.l1.delta", "in [0, 1]"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.n_min=0"], "algo.l1.n_min", ">= 1"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.n_min=50", "algo.l1.n_max=40"], "algo.l1.n_max", "algo.l1.n_min=50"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.n_max=200"], "algo.l1.n_max", "rollout.max_response_length=96"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.stage=both"], "algo.l1.stage", "'exact' | 'max'"),
    ("tiny_cpu_l1_exact.yaml", ["algo.l1.stage=max"], "algo.l1.stage", "set algo.l1.stage=exact"),
    ("tiny_cpu_l1_max.yaml", ["algo.l1.max_fraction=1.2"], "algo.l1.max_fraction", "in [0, 1]"),
    ("tiny_cpu_l1_exact.yaml", ["algo.budgets=[16]"], "algo.budgets", "set algo.budgets=[]"),
    ("tiny_cpu_tlmre.yaml", ["algo.tlmre.alpha=1.0"], "algo.tlmre.alpha", "in [0, 1)"),
    ("tiny_cpu_tlmre.yaml", ["algo.tlmre.std_eps=0"], "algo.tlmre.std_eps", "> 0"),
    ("tiny_cpu_tlmre.yaml", ["algo.tlmre.batch_whiten=maybe"], "algo.tlmre.batch_whiten", "true/false"),
    ("tiny_cpu_tlmre.yaml", ["rollout.n_rollouts=1"], "rollout.n_rollouts", "leave-one-out"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.delta=-0.01"], "algo.adaptthink.delta", ">= 0"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.clip_eps_low=1.0"], "algo.adaptthink.clip_eps_low", "in [0, 1)"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.nothinking_fraction=1.0"], "algo.adaptthink.nothinking_fraction",
     "both modes"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.ref_samples=0"], "algo.adaptthink.ref_samples", ">= 1"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.nothinking_max_response_length=1"],
     "algo.adaptthink.nothinking_max_response_length", "the forced token and one more"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.nothinking_max_response_length=200"],
     "algo.adaptthink.nothinking_max_response_length", "rollout.max_response_length=96"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.thinking_token=</think>"], "algo.adaptthink.thinking_token",
     "differ"),
    ("tiny_cpu_adaptthink.yaml", ["rollout.n_rollouts=1"], "rollout.n_rollouts", "without samples"),
    ("tiny_cpu_adaptthink.yaml", ["algo.adaptthink.reference=problem"], "algo.adaptthink.reference",
     "set algo.adaptthink.reference=level"),
    ("tiny_cpu_adaptthink.yaml", ["algo.tis_cap=2"], "algo.tis_cap", "algo.tis_cap=null"),
    ("tiny_cpu.yaml", ["algo.kl_coef=0.001"], "algo.kl_coef", "no reference model"),
    ("tiny_cpu.yaml", ["eval.modes=[budget:0]"], "eval.modes[0]", "N > 0"),
]


@pytest.mark.parametrize("recipe, overrides, field_name, fix", BASELINE_BAD,
                         ids=[f"{b[0]} {' '.join(b[1])}" for b in BASELINE_BAD])
def test_baseline_settings_give_one_line_errors_naming_the_field(recipe, overrides, field_name, fix):
    with pytest.raises(ConfigError) as info:
        load_recipe(RECIPES / recipe, overrides)
    message = str(info.value)
    assert "\n" not in message and f"{field_name}:" in message and fix in message, message


def test_baseline_defaults_are_the_authors_and_the_tiny_recipes_scale_lengths():
    from megatron_hbpo.algo import constants as c

    l1 = load_recipe(RECIPES / "l1_exact_deepscaler_1p5b.yaml")
    assert (l1.algo.l1.alpha, l1.algo.l1.alpha_max, l1.algo.l1.delta) == (c.L1_ALPHA, c.L1_ALPHA_MAX, c.L1_DELTA)
    assert (l1.algo.l1.n_min, l1.algo.l1.n_max, l1.algo.dual_clip_c) == (100, 4000, None)
    assert load_recipe(RECIPES / "l1_max_deepscaler_1p5b.yaml").algo.l1.stage == "max"
    at = load_recipe(RECIPES / "adaptthink_r1_distill_qwen_1p5b.yaml").algo.adaptthink
    assert (at.delta, at.ref_samples, at.thinking_token, at.nothinking_max_response_length) == (0.05, 16, "Alright",
                                                                                               4096)
    assert load_recipe(RECIPES / "tlmre_r1_distill_qwen_1p5b.yaml").algo.tlmre.batch_whiten is True
    tiny = load_recipe(RECIPES / "tiny_cpu_l1_exact.yaml").algo.l1
    assert tiny.alpha == pytest.approx(c.L1_ALPHA * 4096 / 96, rel=1e-3)
    assert tiny.alpha_max == pytest.approx(c.L1_ALPHA_MAX * 4096 / 96, rel=1e-6)
    assert (tiny.n_min, tiny.n_max) == (round(c.L1_N_MIN * 96 / 4096), round(c.L1_N_MAX * 96 / 4096))
    # Every tiny baseline starts from the embedded default's warm-up base.
    base = load_recipe(TINY).warmup
    for name in ("grpo", "tlmre", "l1_exact", "l1_max", "adaptthink"):
        assert load_recipe(RECIPES / f"tiny_cpu_{name}.yaml").warmup == base
