"""Shared test helpers: the `gpu` marker and a 2-process torchrun launcher for gloo tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped where there is none, as in CI)")
    config.addinivalue_line("markers", "dist: launches several processes with torchrun (gloo)")
    config.addinivalue_line("markers", "slow: long (multi-rank vLLM, world 4, long runs); `make test-slow` runs them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class TorchrunResult:
    proc: subprocess.CompletedProcess
    reports: list[dict]  # each rank's JSON report (tests/dist/common.write_report), by rank

    @property
    def stdout(self) -> str:
        return self.proc.stdout


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 300) -> TorchrunResult:
    """Run tests/dist/<script> under torchrun on CPU; fails the test with its output on error."""
    with tempfile.TemporaryDirectory() as reports:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1", TEST_REPORT_DIR=reports)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "tests" / "dist" / script), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n"
                        f"{proc.stderr[-6000:]}")
        files = sorted(Path(reports).glob("rank*.json"), key=lambda f: int(f.stem[4:]))
        return TorchrunResult(proc, [json.loads(f.read_text()) for f in files])
