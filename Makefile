# `make demo`: set up .venv and run the main job on built-in data. `make test`: set up and run every test
# (what CI runs). `make test-fast`: the quick tier while developing (no slow, no distributed tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast

setup: $(VENV)/.installed

# torch and torchvision are pinned here (they install from this machine's disk); pyproject keeps ranges.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The main job: train the built-in recipe (synthetic scenes, no download; ~6-7 min on 2 idle CPU cores),
# evaluate it, segment four validation scenes, plot the curves. Everything lands in runs/demo.
# On a busy machine `make demo THREADS=1` is often faster (torch's threads compete with other processes).
DEMO := runs/demo
THREADS ?=
RUN_OPTS := $(if $(THREADS),--threads $(THREADS),)
demo: setup
	rm -rf $(DEMO)
	@start=$$(date +%s); \
	$(BIN)/upernet train --out $(DEMO) $(RUN_OPTS) && \
	$(BIN)/upernet eval --model $(DEMO) $(RUN_OPTS) && \
	$(BIN)/upernet predict --model $(DEMO) --out $(DEMO)/predictions $(RUN_OPTS) && \
	$(BIN)/upernet plot $(DEMO) && \
	echo "" && \
	echo "demo finished in $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s:" && \
	echo "  trained model      $(DEMO)/model   (upernet.Segmenter('$(DEMO)/model'), upernet.load_model(...))" && \
	echo "  metrics            $(DEMO)/eval/metrics.json, $(DEMO)/eval/per_class.csv" && \
	echo "  training log       $(DEMO)/metrics.jsonl, checkpoints in $(DEMO)/checkpoints" && \
	echo "  predictions        $(DEMO)/predictions (label maps and overlays of 4 built-in validation scenes)" && \
	echo "  curves             $(DEMO)/plots/loss.png, lr.png, miou.png"

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed"
