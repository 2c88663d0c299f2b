# The two commands of the README: `make demo` (set-up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# tune on the built-in data (test scored on a 50-per-class sample), then a 2-member ensemble;
# ends with ensemble vs best member
demo: $(STAMP)
	$(BIN)/ar-ray tune --space search_spaces/quick.yaml --trials 6 --limit-per-class 50 \
		--name demo --overwrite
	$(BIN)/ar-ray ensemble --from runs/demo --members 2 --epochs 8 --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the pure tests (recipe, data, config, weights, report): no Ray, no subprocess, minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not cluster and not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
