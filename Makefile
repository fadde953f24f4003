# Two commands do all set-up on a fresh machine: `make dev` and `make test` (see README.md).
PYTHON ?= python3
# constraints.txt is the one lock (the .venv here, CI through `make test`, and the Dockerfile). torch goes in
# first, on its own, at the lock's version: the CPU wheel locally (the Dockerfile installs the CUDA wheel of the
# same version instead), so nothing later can make pip pick a torch by itself.
TORCH ?= $(shell grep '^torch==' constraints.txt)
# Where that wheel comes from: pip's own configuration by default (the workplace's machines find the CPU wheel
# locally); on a machine whose pip would take PyPI's CUDA build, `make TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The suite's processes (pytest-xdist, a file's tests in one): the tests mostly wait on emulators and
# subprocesses, so one more than the cores, up to four (on 2 cores, one checkout, one after another: 2 processes
# took 13:52, 3 11:14, 4 12:00; a fresh clone's first run with 3, 13:37).
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(min(4, max(2, (n or 1) + 1)))")
# A test process that dies (a segfault in a C extension) fails its test and ends the run: pytest-xdist 3.8 puts
# a replacement process in its place, which under --dist loadfile can wait forever for work (pytest-xdist
# #1378): a CI run timed out so after a gRPC segfault.
XDIST_ARGS = -n $(TEST_WORKERS) --dist loadfile --max-worker-restart 0

.PHONY: venv firebase-cli web web-types dev submit lint test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(STAMP)

# functions/venv (python3.11), firebase-tools and a Java 21+ runtime in git-ignored folders, for the tests that
# run the Firebase CLI's Auth and Functions emulators. Each step is skipped when already done.
firebase-cli:
	$(PYTHON) scripts/setup_firebase_cli.py

# The web app: npm packages and the bundle in web/ (git-ignored), skipped when up to date.
web:
	$(PYTHON) scripts/setup_web.py

# web/src/contract.gen.ts from the contract's JSON Schema (tests/test_schema.py fails when it is stale).
web-types: $(STAMP)
	$(BIN)/python -m devtools.web_types

# A failed Firebase CLI or web set-up does not stop `make dev`: the stack then says so and runs without it.
dev: $(STAMP)
	-$(PYTHON) scripts/setup_firebase_cli.py
	-$(PYTHON) scripts/setup_web.py
	$(BIN)/python -m devtools.stack $(DEV_ARGS)

# While `make dev` runs: make submit PROMPT="a lighthouse at dusk" [VIDEO=1]
# PROMPT="" (given, empty) sends the empty prompt, which the contract refuses; left out, it is a usage error.
SUBMIT_USAGE := make submit: PROMPT is required, e.g. make submit PROMPT="a lighthouse at dusk" (VIDEO=1 for a video)
# SUBMIT_ARGS=--help needs no PROMPT: it only lists the client's flags.
submit: $(STAMP)
	@$(if $(filter -h --help,$(SUBMIT_ARGS)),,$(if $(filter undefined,$(origin PROMPT)),echo '$(SUBMIT_USAGE)' >&2; exit 2))
	$(BIN)/python -m devtools.client --prompt "$(PROMPT)" $(if $(VIDEO),--video) $(if $(OPTIONS),--options '$(OPTIONS)') $(SUBMIT_ARGS)

# Lint, format and types: the same configuration (pyproject.toml) as the pre-commit hooks.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# --browser: Debian's chromium (apt-get) for the browser tests, which Playwright drives.
test: $(STAMP) firebase-cli lint
	$(PYTHON) scripts/setup_web.py --browser
	$(BIN)/python -m pytest $(XDIST_ARGS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) out .pytest_cache functions/venv .emulators web/node_modules web/dist
