# videolights — two commands do all set-up on a fresh machine:
#   make demo   train + evaluate + figures on the embedded synthetic data (CPU, minutes)
#   make test   every notebook as a test, then pytest
#   make notebooks [NB=nbs/07_model.ipynb]   re-execute notebooks and store their outputs (after changing one)
#   make docs   the documentation site in _site/ (open _site/index.html)
# TORCH selects the torch requirement (default: the CPU build 2.13.0; see README for CUDA).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
NB_WORKERS ?= 2
export OMP_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg
# The official code for the side-by-side checks (tools/official/setup.sh, `make official OFFICIAL_SRC=...`):
# tests and tools read VIDEOLIGHTS_OFFICIAL / VIDEOLIGHTS_OFFICIAL_PY; set them, or keep a set-up in OFFICIAL_HOME.
OFFICIAL_HOME ?= .official
ifneq ($(wildcard $(OFFICIAL_HOME)/official/video_lights/model.py),)
export VIDEOLIGHTS_OFFICIAL ?= $(abspath $(OFFICIAL_HOME)/official)
export VIDEOLIGHTS_OFFICIAL_PY ?= $(abspath $(OFFICIAL_HOME)/venv/bin/python)
endif

.PHONY: install demo test test-nbs test-py clean-check export-check outputs-check test-slow official notebooks docs docs-install

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python settings.ini setup.py
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/videolights demo --out runs/demo

clean-check: install
	bash tools/no_diff.sh $(BIN)/nbdev_clean

export-check: install
	bash tools/no_diff.sh $(BIN)/nbdev_export

# every notebook's stored outputs were made by its current code (`make notebooks` stamps them; see CONTRIBUTING.md)
outputs-check: install
	$(BIN)/python tools/nbrun.py check

# NB: notebooks to execute (default: all of nbs/); their outputs are stored in the notebooks, cleaned and stamped
NB ?=
notebooks: install
	$(BIN)/python tools/nbrun.py run --workers $(NB_WORKERS) $(NB)

DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) settings.ini setup.py
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs-install: $(DOCS_STAMP)

# the site in _site/ from the stored outputs (nothing is executed); needs no Quarto
docs: docs-install
	$(BIN)/python tools/docs.py

test-nbs: install
	@n=$$(ls nbs/*.ipynb 2>/dev/null | grep -v '/_' | wc -l); \
	  if [ "$$n" -eq 0 ]; then echo "no notebooks found in nbs/"; exit 1; fi; \
	  echo "nbdev_test: $$n notebooks"
	$(BIN)/nbdev_test --n_workers $(NB_WORKERS) --timing

test-py: install
	$(BIN)/python -m pytest tests/ -q -p no:cacheprovider

test: clean-check export-check outputs-check test-nbs test-py

test-slow: install docs-install
	@echo "official checkout: $${VIDEOLIGHTS_OFFICIAL:-none (the side-by-side checks are skipped; see make official)}"
	$(BIN)/nbdev_test --n_workers 1 --flags slow
	$(BIN)/python -m pytest tests/ -q -m "slow or not slow" --runslow

# a scratch copy of the official code + its environment in OFFICIAL_HOME (OFFICIAL_SRC: a git dir or URL of
# github.com/dpaul06/VideoLights); nothing official is committed
official:
	@test -n "$(OFFICIAL_SRC)" || { echo "usage: make official OFFICIAL_SRC=GIT_DIR_OR_URL [OFFICIAL_HOME=DIR]"; exit 2; }
	bash tools/official/setup.sh "$(OFFICIAL_SRC)" "$(OFFICIAL_HOME)"
