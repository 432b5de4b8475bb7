# Two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# (Environment defaults such as HF_HUB_OFFLINE live in dissect_common/env.py, set by every entry point.)

.PHONY: setup test demo data lint bench clean

# -qq: errors only. (pip's warnings here are about the machine's pip configuration, e.g. a
# find-links folder that does not exist, one line per package: about 110 lines, none ours.)
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -e '.[dev]'
	touch $(STAMP)

# DeepSpeed JIT-compiles a CPU comm op on first use (into .venv/torch_extensions, or
# $$TORCH_EXTENSIONS_DIR): build it here, once, outside any test timeout. Loads in seconds when built.
setup: $(STAMP)
	@$(BIN)/python -c 'import pipeline.engine as e; e.build_ops()'

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15

demo: setup
	./scripts/demo.sh

# Fashion-MNIST from Debian; installed when missing (needs root or sudo).
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FMNIST):
	@echo "installing dataset-fashion-mnist (the demo's real images)"
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	{ $$SUDO apt-get install -y -q dataset-fashion-mnist || \
	  { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; } || \
	{ echo "could not install it: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; }

# The demo shards (40% caption noise) in data/fmnist; reused when already complete.
data: $(STAMP) $(FMNIST)
	$(BIN)/dissect-prep demo --out data/fmnist --noise 0.4

# ruff's linter and its formatter, at the line length pyproject.toml states (CI runs this first).
lint: $(STAMP)
	$(BIN)/ruff check pipeline data_prep dissect_common benchmarks scripts tests
	$(BIN)/ruff format --check pipeline data_prep dissect_common benchmarks scripts tests

# What `make demo` made: the venv (with the built comm op), the demo shards and the demo run.
# (The Debian package dataset-fashion-mnist stays: `apt-get remove dataset-fashion-mnist`.)
clean:
	rm -rf $(VENV) runs/demo data/fmnist *.egg-info
