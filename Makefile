# Set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q
# CPU-usable torch build served locally here; pinned so pip never pulls a newer
# multi-GB CUDA wheel on its own.
TORCH = torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint docs docs-full bench

install:
	$(PIP) $(TORCH)
	$(PIP) -e ".[test]"

demo: install
	MPLBACKEND=Agg $(PYTHON) examples/plot_quickstart_elpv.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest -q

# The docs with the example gallery executed. `make docs` (and CI) runs the
# examples in quick mode, SKPADIM_EXAMPLES_QUICK=1: fewer, smaller images,
# about a minute on 2 idle CPU cores. `make docs-full` runs them at full size
# (about 9 minutes there). Both write docs/_build/html; see CONTRIBUTING.md.
SPHINX = MPLBACKEND=Agg SKPADIM_DOCS_RUN_EXAMPLES=1 $(PYTHON) -m sphinx -W --keep-going -q -b html docs docs/_build/html

docs:
	$(PIP) $(TORCH)
	$(PIP) -e ".[docs]"
	SKPADIM_EXAMPLES_QUICK=1 $(SPHINX)

docs-full:
	$(PIP) $(TORCH)
	$(PIP) -e ".[docs]"
	SKPADIM_EXAMPLES_QUICK=0 $(SPHINX)

bench: install
	$(PYTHON) benchmarks/bench_predict.py
	$(PYTHON) benchmarks/bench_fit_memory.py
