"""Helpers shared by test modules: running the repo's tools and test scripts, and building a policy."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO


def repo_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that imports this checkout's package."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **extra)


def run_tool(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """tools/<tool> in a subprocess (one thread); the caller checks the exit status."""
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], capture_output=True, text=True,
                          env=repo_env(OMP_NUM_THREADS="1"), timeout=timeout)


def run_script(name: str, *args: str, timeout: float = 600) -> str:
    """tests/scripts/<name> in a subprocess; fails the test with its output unless it exits 0."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / name), *args], capture_output=True,
                          text=True, env=repo_env(OMP_NUM_THREADS="2"), timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{name} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def load_tool():
    """tools/evaluate.py as a module (registered first: its dataclasses look themselves up there)."""
    if "evaluate_tool" not in sys.modules:
        spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["evaluate_tool"] = module
        spec.loader.exec_module(module)
    return sys.modules["evaluate_tool"]
