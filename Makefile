# Set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q
# CPU-usable torch build served locally here; pinned so pip never pulls a newer
# multi-GB CUDA wheel on its own.
TORCH = torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint docs bench

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

docs:
	$(PIP) $(TORCH)
	$(PIP) -e ".[docs]"
	$(PYTHON) -m sphinx -W --keep-going -q -b html docs docs/_build/html

bench: install
	$(PYTHON) benchmarks/bench_predict.py
	$(PYTHON) benchmarks/bench_fit_memory.py
