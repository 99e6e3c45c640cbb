# The two commands of the README: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# These machines set PYTHONDONTWRITEBYTECODE=1; without .pyc files every process spends
# ~11 s importing torch + torchrec + lightning, so let ours write bytecode.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torchrec goes in with --no-deps: every release requires the CUDA `fbgemm-gpu`, which would
# overwrite the CPU kernels of `fbgemm-gpu-cpu` (a pyproject dependency) and break the import.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet 'torch==2.13.0+cpu' -e '.[dev]'
	$(PIP) install --quiet --no-deps torchrec==1.8.0
	$(PY) -c "import torchrec, lightning; print('torchrec', torchrec.__version__, 'lightning', lightning.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/fltk fit --experiment experiments/taobao.yaml

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check fltoolkit recsys datamodules tests benchmarks examples

bench: setup
	$(PY) benchmarks/prepare.py

clean:
	rm -rf $(VENV) runs .pytest_cache
