# The two commands of the README: `make demo` (set-up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint mutation

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# tune on the built-in data (test scored on a 50-per-class sample), every trial to its end,
# then the best 4 trials are the ensemble's members as they are (bench/ensemble_gain.py:
# reused trials gained most, at no extra epochs); ends with the ensemble's test gain over
# its best member, with its 95% interval
demo: $(STAMP)
	$(BIN)/ar-ray tune --space search_spaces/quick.yaml --trials 6 --epochs 8 \
		--grace-period 8 --limit-per-class 50 --name demo --overwrite
	$(BIN)/ar-ray ensemble --from runs/demo --members 4 --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the pure tests (recipe, data, config, weights, report): no Ray, no subprocess, minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not cluster and not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# mutmut over the pure modules, judged by their fast tests (pyproject's [tool.mutmut]); not
# part of `test`: it takes minutes. Starts from scratch (mutmut reuses stale verdicts
# otherwise), one thread per test process, and writes bench/results/mutation.txt.
MUTMUT_RUN := mutmut run --max-children 2
mutation: $(STAMP)
	rm -rf mutants
	start=$$(date +%s) && OMP_NUM_THREADS=1 $(BIN)/$(MUTMUT_RUN) && \
		$(BIN)/python bench/mutation_summary.py --seconds $$(( $$(date +%s) - start )) \
		--command "OMP_NUM_THREADS=1 $(MUTMUT_RUN)"
