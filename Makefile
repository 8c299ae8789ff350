# The project's two set-up commands (`make run`, `make test`) and their helpers.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := node_modules/.installed-stamp

.PHONY: run test lint format bench demo clean

# The venv is rebuilt only when the dependency list changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned torch/torchvision pair first (one build for CPU and GPU workers; see README).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[web,dev]'
	touch $@

# Front-end libraries (uPlot) come from npm's lockfile, served by Django's staticfiles.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: $(STAMP) $(NODE_STAMP)
	$(PY) -m webapp.localstack

test: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# A distillation on the built-in digits data from the command line, no web app.
demo: $(STAMP)
	$(PY) -m kd_core demo

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules var
