# blogpipe — one task runner. `make run` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TASKS_VENV := .venv-tasks
TASKS_EMULATOR := $(TASKS_VENV)/bin/gcloud-tasks-emulator
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint fmt bench fuzz emulators clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "blogpipe needs Python 3.11+ (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $(STAMP)

install: $(STAMP)

# The whole pipeline in one process on embedded defaults (embedded PostgreSQL under
# .blogpipe/, the postgres broker, the in-process task queue, the offline LLM unless
# OPENAI_API_KEY is set). Migrations are applied at start-up.
run: install
	$(BIN)/blogpipe dev

# The Cloud Tasks emulator pins protobuf<5, so it lives in its own virtualenv.
$(TASKS_EMULATOR):
	@$(PYTHON) -m venv $(TASKS_VENV) && $(TASKS_VENV)/bin/pip install -q "gcloud-tasks-emulator==0.6.2" \
	  || echo "warning: could not install gcloud-tasks-emulator; Cloud Tasks tests will skip"

emulators: $(TASKS_EMULATOR)

test: install emulators
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check core api stages notifier blogpipe bench tests
	$(BIN)/ruff format --check core api stages notifier blogpipe bench tests
	$(BIN)/mypy core api stages notifier blogpipe

fmt: install
	$(BIN)/ruff format core api stages notifier blogpipe bench tests
	$(BIN)/ruff check --fix core api stages notifier blogpipe bench tests

bench: install
	$(BIN)/python -m bench

# Schemathesis against /openapi.json with many more examples than `make test` runs.
fuzz: install
	BLOGPIPE_FUZZ_EXAMPLES=300 BLOGPIPE_FUZZ_MODES=all $(BIN)/pytest tests/integration/test_schemathesis.py -p no:cacheprovider

clean:
	rm -rf $(VENV) $(TASKS_VENV) .pytest_cache .mypy_cache .ruff_cache
