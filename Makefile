# The two commands of the README. Both create .venv when it is missing; torch stays pinned to
# the CPU build through constraints.txt (a loose torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_DATA := data/quickstart

.PHONY: quickstart test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# SFT -> RM -> PPO on a private local Ray; a second run skips the stages that are up to date.
quickstart: $(STAMP)
	$(BIN)/rlhf data synth --out $(QUICKSTART_DATA)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/rlhf pipeline --config configs/pipeline.yaml

# Fast tests first; the slow end-to-end ones run after them in the same session while the
# session is younger than TEST_BUDGET_MINUTES (0: all of them), so the suite stays near 15
# minutes on 2 cores; a slow test left out is listed as skipped with the reason.
TEST_BUDGET_MINUTES ?= 11
test: $(STAMP)
	$(BIN)/python -m pytest -q --slow-budget-minutes=$(TEST_BUDGET_MINUTES)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs $(QUICKSTART_DATA)
