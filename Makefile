# Two commands on a fresh machine:
#   make run    set up .venv if missing, then train the three models and play the game on the default config
#   make test   same venv plus the test-only packages, then the test suite on 8 simulated CPU devices
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= default

.PHONY: run test bench clean

# The project and its runtime dependencies (what `make run` needs).
$(BIN)/distgame: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Plus the `test` extra: pytest, ruff, transformers + CPU torch (HF parity), libtpu (TPU compile-check).
$(VENV)/.test-deps: $(BIN)/distgame
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/distgame
	$(BIN)/distgame run --config $(CONFIG)

# ruff first (seconds): formatting and lint. JAX_PLATFORMS=cpu: with libtpu installed, JAX would otherwise probe
# for a TPU first.
test: $(VENV)/.test-deps
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests

bench: $(BIN)/distgame
	$(BIN)/distgame bench --config $(CONFIG)

clean:
	rm -rf runs
