"""tools/gpu_check.py: its CPU mode runs every stage on a tiny model; stages write JSON as they end,
a failing stage does not stop the others, and a time limit skips what is left."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

NUMBERS = {
    "attention": ["sdpa_causal_ms", "sdpa_tree_ms", "unfused_causal_ms", "unfused_over_sdpa", "sdpa_max_error_causal",
                  "unfused_max_error_tree"],
    "hf_baseline": ["tokens_per_s", "mfu"],
    "train": ["tokens_per_s", "mfu", "model_tflop_per_step", "loss", "grad_norm", "over_hf_baseline"],
    "logp": ["tokens_per_s"],
    "plan": ["predicted_train_gib", "predicted_allocated_gib"],
    "export": ["device_gb_per_s", "host_gb_per_s", "gb"],
    "vllm": ["refit_s", "mismatch_mean_abs", "mismatch_max_abs"],
}


def test_cpu_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu-tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert set(results) == {name for name, _ in gpu_check.STAGES}
    vllm_installed = results["env"]["vllm_installed"]
    for stage, keys in NUMBERS.items():
        if stage == "vllm" and not vllm_installed:
            assert results["vllm"]["status"] == "skipped"
            continue
        assert results[stage]["status"] == "ok", results[stage]
        for key in keys:
            assert math.isfinite(results[stage][key]), (stage, key, results[stage][key])
    train = results["train"]
    assert (train["attention_backend"], train["params_dtype"], train["recompute"]) == ("sdpa", "bf16", "selective")
    assert train["sdpa_kernels"] and not train["mfu_meaningful"]
    assert results["plan"]["measured_peak_allocated_gib"] is None  # no CUDA allocator to compare with
    for stage in ("te", "te_fp8"):
        assert results[stage]["status"] == "skipped" and results[stage]["reason"]
    table = proc.stdout[proc.stdout.index("stage "):]
    for name, _ in gpu_check.STAGES:
        assert f"\n{name} " in table
    assert "meaningless" in table


def test_stages_report_as_they_end_and_failures_do_not_stop_the_rest(tmp_path, monkeypatch, capsys):
    def fails(ctx):
        raise RuntimeError("out of memory, say")

    def skips(ctx):
        raise gpu_check.Skip("no such package")

    monkeypatch.setattr(gpu_check, "STAGES", [("first", lambda ctx: {"x": 1}), ("train", fails), ("te", skips),
                                              ("logp", lambda ctx: {"tokens_per_s": 5.0})])
    args = argparse.Namespace(time_limit=100.0)
    ctx = gpu_check.Context(args=args, out=tmp_path, on_gpu=False)
    assert gpu_check.run(ctx, None) == 1
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["status"] == "error" and "out of memory" in train["error"] and "Traceback" in train["traceback"]
    assert json.loads((tmp_path / "te.json").read_text())["reason"] == "no such package"
    assert json.loads((tmp_path / "logp.json").read_text())["tokens_per_s"] == 5.0
    printed = capsys.readouterr().out
    assert "[te] skipped" in printed and "[train] error" in printed


def test_a_time_limit_skips_what_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", [("first", lambda ctx: {}), ("logp", lambda ctx: {"tokens_per_s": 1.0})])
    ctx = gpu_check.Context(args=argparse.Namespace(time_limit=-1.0), out=tmp_path, on_gpu=False)
    assert gpu_check.run(ctx, None) == 0
    assert "time limit" in json.loads((tmp_path / "logp.json").read_text())["reason"]


@pytest.mark.parametrize("name", ["H100 80GB HBM3", "NVIDIA H200"])
def test_the_peak_is_the_dense_bf16_datasheet_value(name, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda *a: name)
    ctx = gpu_check.Context(args=argparse.Namespace(), out=REPO, on_gpu=True)
    assert ctx.peak_flops == (989e12, True)
