# One command sets up and runs the demo, one sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cellfit-installed
# torch pinned to the build this project is tested with (pip takes it from local disk here)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all,test]" $(TORCH)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cellfit demo

test: $(STAMP)
	bash scripts/system-deps.sh
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info cellfit-demo
