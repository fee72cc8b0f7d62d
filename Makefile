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

# The main job: train the built-in recipe (synthetic scenes, no download; ~7 min on 2 CPU cores),
# evaluate it, segment a few validation images, plot the curves. Everything lands in runs/demo.
DEMO := runs/demo
demo: setup
	rm -rf $(DEMO)
	@start=$$(date +%s); \
	$(BIN)/upernet train --out $(DEMO) && \
	$(BIN)/upernet eval $(DEMO)/config.yaml --checkpoint $(DEMO)/model --out $(DEMO)/eval && \
	$(BIN)/python -c "from upernet.data.synthetic import write_synthetic_folder as w; w('$(DEMO)/val_images', num_train=0, num_val=4)" && \
	$(BIN)/upernet predict $(DEMO)/val_images/img_dir/val --model $(DEMO)/model --out $(DEMO)/predictions && \
	$(BIN)/upernet plot $(DEMO) && \
	echo "" && \
	echo "demo finished in $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s:" && \
	echo "  trained model      $(DEMO)/model   (upernet.load_model('$(DEMO)/model'))" && \
	echo "  metrics            $(DEMO)/eval/metrics.json, $(DEMO)/eval/per_class.csv" && \
	echo "  training log       $(DEMO)/metrics.jsonl, checkpoints in $(DEMO)/checkpoints" && \
	echo "  predictions        $(DEMO)/predictions (labels, overlays; ground truth in $(DEMO)/val_images/ann_dir/val)" && \
	echo "  curves             $(DEMO)/plots/loss.png, lr.png, miou.png"

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed"
