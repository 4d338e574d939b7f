# Each target bootstraps .venv itself. torch is pinned and installed first: a looser pin pulls a
# multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo test venv clean

venv: $(STAMP)

# deploy/requirements.lock (the Docker image's constraints) pins every other package too, so the venv, CI and the
# image run the same versions and a new release on PyPI (boto3 1.44.18 over the locked 1.44.8, 2026-12-06) cannot
# change what the tests see; regenerate it as its header says when a dependency is meant to move.
$(STAMP): pyproject.toml deploy/requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' -c deploy/requirements.lock
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer demo --config configs/toy_birds.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) data runs mlartifacts mlflow.db
