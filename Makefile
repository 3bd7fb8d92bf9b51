# flowmatch — make targets. `make help` lists them.
# On a fresh machine: `make demo` (venv + install + toy experiments + report) and `make test`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned here and installed before anything that depends on it; an unpinned torch would
# make pip pull a multi-GB CUDA build. Override e.g. `make install TORCH_SPEC="torch==2.5.1"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-flowmatch
DEMO_OUT ?= runs/demo
BENCH_OUT ?= runs/bench
REFLOW_OUT ?= runs/reflow
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test bench reflow clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install flowmatch with its dependencies

demo: $(STAMP) ## train the toy experiments on CPU (~5 min), benchmark them, write runs/demo/report.md
	$(PY) -m flowmatch demo --out $(DEMO_OUT)

test: $(STAMP) ## run the tests and the notebooks (smoke mode), offline
	FLOWMATCH_SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest -q --nbmake tests notebooks $(PYTEST_ARGS)

bench: demo ## benchmark the demo's checkpoints per task into runs/bench/<task>/
	@for task in noise_to_moons noise_to_8gaussians 8gaussians_to_moons; do \
	  $(PY) -m flowmatch bench $(DEMO_OUT)/runs/$${task}_icfm/checkpoints/last.pt \
	    $(DEMO_OUT)/runs/$${task}_ot/checkpoints/last.pt --out $(BENCH_OUT)/$$task --no-progress || exit 1; \
	done

clean: ## remove run outputs (runs/, wandb/)
	rm -rf runs wandb

distclean: clean ## also remove the virtual environment
	rm -rf $(VENV) *.egg-info

reflow: $(STAMP) ## reflow chains 1-RF -> 2-RF -> 3-RF -> distil on the three toy tasks -> runs/reflow/ (~15 min)
	$(PY) -m flowmatch reflow run experiments/toy/reflow_noise_to_moons.yaml \
	  experiments/toy/reflow_noise_to_8gaussians.yaml experiments/toy/reflow_8gaussians_to_moons.yaml \
	  --out $(REFLOW_OUT) --no-progress
