"""HF <-> Megatron conversion tools, loading at TP=2 / PP=2, the export stream, and bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_torchrun

VOCAB = 101  # not a multiple of TP or of the padding unit


def save_tiny(path, family: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    if family == "qwen2":  # GQA, q/k/v bias, untied
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common))
    else:  # MHA, tied embeddings
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, tie_word_embeddings=True, **common))
    model.save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hf.save_pretrained(path)


def convert(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_tiny(root / "hf", request.param)
    proc = convert("convert_hf_to_megatron.py", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt"),
                   "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, root


def test_round_trip_is_bit_exact(converted):
    family, root = converted
    proc = convert("convert_megatron_to_hf.py", "--ckpt", str(root / "ckpt"), "--out", str(root / "back"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_file(root / "hf" / "model.safetensors")
    index = json.loads((root / "back" / "model.safetensors.index.json").read_text())
    back = {}
    for shard in set(index["weight_map"].values()):
        back.update(load_file(root / "back" / shard))
    assert sorted(back) == sorted(original)  # vocabulary padding dropped, no lm_head when tied
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (root / "back" / name).is_file(), name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "back")
    assert model.config.tie_word_embeddings == (family == "llama")
    assert AutoTokenizer.from_pretrained(root / "back").chat_template is not None
    meta = json.loads((root / "ckpt" / "hbpo_checkpoint.json").read_text())
    assert meta["vocab_size"] == VOCAB and meta["padded_vocab_size"] == 128 and meta["family"] == family


@pytest.mark.dist
# Each family at one layout by default (Qwen2's q/k/v bias split over TP, Llama's tied embedding over the
# pipeline's first and last stage); the other two pairs run with the slow tests.
@pytest.mark.parametrize(("converted", "mode"), [("qwen2", "tp"), ("llama", "pp"),
                                                 pytest.param("qwen2", "pp", marks=pytest.mark.slow),
                                                 pytest.param("llama", "tp", marks=pytest.mark.slow)],
                         indirect=["converted"])
def test_converted_checkpoint_at_tp2_and_pp2(converted, mode):
    _, root = converted
    proc = run_torchrun("converted_checkpoint.py", "--hf-dir", str(root / "hf"), "--ckpt", str(root / "ckpt"),
                        "--mode", mode, nproc=2)
    assert len(proc.reports) == 2
    for report in proc.reports:
        assert report["failures"] == []  # tensors equal the HF originals, same order twice, bounded buckets
        assert report["logp_max_diff"] <= 1e-5 and report["exported"] > 0


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "hf"
    save_tiny(path, "qwen2")
    return path


def copy_model(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def assert_refused(tmp_path, hf_dir, words):
    proc = convert("convert_hf_to_megatron.py", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_unknown_architecture(tmp_path, tiny_hf):
    bad = copy_model(tiny_hf, tmp_path / "gpt2")
    config = json.loads((bad / "config.json").read_text())
    from transformers import GPT2Config

    (bad / "config.json").write_text(json.dumps({**GPT2Config().to_dict(), "architectures": ["GPT2LMHeadModel"]}))
    assert config["model_type"] == "qwen2"
    assert_refused(tmp_path, bad, "unsupported architecture 'gpt2'")


def test_missing_tensor(tmp_path, tiny_hf):
    bad = copy_model(tiny_hf, tmp_path / "missing")
    state = load_file(bad / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert_refused(tmp_path, bad, "missing tensors ['model.layers.1.mlp.up_proj.weight']")


def test_wrong_num_key_value_heads(tmp_path, tiny_hf):
    bad = copy_model(tiny_hf, tmp_path / "kv")
    config = json.loads((bad / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    assert_refused(tmp_path, bad, "k_proj.weight has shape (32, 64), config.json implies (64, 64)")


def test_truncated_safetensors(tmp_path, tiny_hf):
    bad = copy_model(tiny_hf, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, bad, "may be truncated")


@pytest.mark.parametrize("converted", ["qwen2"], indirect=True)  # the refusal does not depend on the family
def test_existing_output_needs_overwrite(tmp_path, converted):
    _, root = converted
    proc = convert("convert_hf_to_megatron.py", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt"))
    assert proc.returncode == 2 and "already holds a checkpoint; pass --overwrite" in proc.stderr
    proc = convert("convert_megatron_to_hf.py", "--ckpt", str(root / "ckpt"), "--out", str(root / "hf"))
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr


def test_interrupted_write_never_looks_complete(tmp_path):
    # A process killed halfway through leaves only a hidden temporary directory, which no tool accepts.
    code = ("import os, sys; from megatron_hbpo.atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n"
            "    (tmp / 'megatron').mkdir(); (tmp / 'megatron' / 'half.distcp').write_bytes(b'x' * 100)\n"
            "    os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert not (tmp_path / "ckpt").exists()
    assert [p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir()] == [True]
    (tmp_path / "ckpt").mkdir()  # even a directory of that name without the marker is refused
    proc = convert("convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 2 and "not a complete converted checkpoint" in proc.stderr
