# Quickstart: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch/torchvision from this machine's disk (a CUDA build that also runs on the CPU); pip, not uv.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Serving (Triton's Python backend in PyTriton's wheel needs numpy < 2, which the training and DICOM extras cannot share): its own torch-free venv.
SERVE_VENV ?= .venv-serve

.PHONY: demo test test-slow lint format docs install install-serve clean

$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	touch $@

$(VENV)/.installed: $(VENV)/.torch-installed pyproject.toml
	$(PIP) install --quiet -e '.[train,prune,qat,openvino,dicom,test]'
	touch $@

install: $(VENV)/.installed

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet -e '.[serve]'
	touch $@

install-serve: $(SERVE_VENV)/.installed

demo: install
	$(VENV)/bin/lggdeploy demo --out demo

test: install
	$(PY) -m pytest -q --durations=15 -m "not slow"

# The slow set also runs `lggdeploy serve` from the serving venv against the engines the tests build.
test-slow: install $(SERVE_VENV)/.installed
	LGG_SERVE_PYTHON=$(SERVE_VENV)/bin/python $(PY) -m pytest -q --durations=10 -m slow

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[docs]'
	touch $@

# The docs site: a broken link or a page missing from the nav fails the build.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(SERVE_VENV) demo runs
