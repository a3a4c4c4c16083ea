# Quick start: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

# The browser test of the MLflow UI (tests/orchestrator/test_mlflow_study.py) needs Chromium; without
# it that test is skipped. Debian/Ubuntu: apt-get install -y chromium
install: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		echo "note: no Chromium, so the MLflow UI browser test will be skipped (Debian: apt-get install -y chromium)"

# Re-run pip only when the project metadata changed (idempotent and fast otherwise).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/sspctl demo --output runs/demo

test: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

test-fast: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
