# Two commands set everything up from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paramdyn-installed
CORES ?= 2

.PHONY: setup demo test lint fmt bench disk

# The virtual environment, with every package pinned by constraints.txt; rebuilt when the
# pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The whole workflow on the embedded data: the four studies' demo variants (the quick study
# `demo`, config.yaml's default `run`, is what a bare `snakemake --cores 2` builds).
# `paramdyn snakemake` is snakemake under a lock the kernel drops when the run dies: after a
# killed `make demo` the rerun clears the dead run's Snakemake locks, and a second
# `make demo` while one is alive is refused (src/paramdyn/runlock.py).
DEMO_STUDIES := [depth,dynamics,gradients,cnn_vs_resnet]
comma := ,
demo: $(STAMP)
	$(BIN)/paramdyn snakemake --cores $(CORES) --rerun-incomplete --config 'run=$(DEMO_STUDIES)' variant=demo
	$(BIN)/paramdyn snakemake --config 'run=$(DEMO_STUDIES)' variant=demo --report results/report.html
	@echo "demo done: tables in results/<study>/*.parquet, figures in results/<study>/figures/, report in results/report.html"
	@echo "findings (results/<study>/findings.md):"
	@$(BIN)/paramdyn findings config.yaml --variant demo --run $(subst $(comma), ,$(patsubst [%],%,$(DEMO_STUDIES)))

# Checkpoint storage each study of config.yaml will need, before anything runs.
disk: $(STAMP)
	$(BIN)/paramdyn disk config.yaml --run $$($(BIN)/python -c "import yaml; print(' '.join(yaml.safe_load(open('config.yaml'))['studies']))")

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src scripts tests benchmarks
	$(BIN)/ruff format --check src scripts tests benchmarks
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

fmt: $(STAMP)
	$(BIN)/ruff format src scripts tests benchmarks
	$(BIN)/ruff check --fix src scripts tests benchmarks
	$(BIN)/snakefmt Snakefile rules

# Every benchmarks/bench_*.py, in sorted order; stops at the first that fails. Each prints
# as its last line `NAME: ratio VALUE (what over what)`; results in benchmarks/RESULTS.md.
bench: $(STAMP)
	@set -e; for f in $$(ls benchmarks/bench_*.py | LC_ALL=C sort); do \
		echo "== $$f"; $(BIN)/python $$f; \
	done
