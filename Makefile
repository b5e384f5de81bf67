# Two commands do all set-up: `make train` and `make test`. Each creates (or reuses) the
# virtual environment .venv, installs what is missing and runs. A second call is quick: the
# environment is rebuilt only when setup.py, requirements.txt or csrc/ change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# torch to install when the base python has none (a CPU-only machine gets this file's build).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastlab-installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: setup train test test-fast bench-gpu bench clean
setup: $(STAMP)

# A base python that already has torch (e.g. a CUDA image) lends it to the venv, so the
# installed torch is reused rather than replaced.
$(STAMP): setup.py requirements.txt $(CSRC)
	@test -x $(PY) || { \
	  if $(PYTHON) -c 'import torch' 2>/dev/null; then \
	    echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; }
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c 'import fastlab, fastlab.kernels; print("fastlab", fastlab.__version__, "installed")'
	@touch $(STAMP)

train: $(STAMP)
	$(PY) -m fastlab.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# On a GPU machine: GPU tests and benches, results under $(RESULTS).
RESULTS ?= benches/results/latest
bench-gpu: $(STAMP)
	bash benches/gpu_check.sh $(RESULTS)

# On a GPU machine whose python3 has CUDA torch (as bench-gpu): every bench and
# benches/results/<gpu>-<date>/REPORT.md (BENCH_PARTS picks parts: kernels e2e extra;
# BENCH_OUT names another folder).
bench:
	bash benches/bench_all.sh $(BENCH_OUT)

clean:
	rm -rf $(VENV) build *.egg-info fastlab/_C*.so
