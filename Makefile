# One command on a fresh clone: `make test` creates .venv on first use, then runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0

.PHONY: setup run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision from the package registry, together: torchvision's
	# compiled ops need the registry's torch build (it also runs on the CPU), not the
	# CPU-only wheel some machines keep on local disk, which the blank find-links skips.
	PIP_FIND_LINKS=" " $(BIN)/pip install -q torch==$(TORCH_VERSION) \
		torchvision==$(TORCHVISION_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m recipes.train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m benchmarks.losses

clean:
	rm -rf $(VENV)
