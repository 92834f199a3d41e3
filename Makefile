# Two commands on a fresh machine:
#   make run    set up .venv if missing, then train the three models and play the game on the default config
#   make test   same venv, then the test suite on 8 simulated CPU devices
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= default
# pip extras of the venv; CI adds tpu (libtpu, 213 MB wheel) so compile-check's TPU tests run for real
EXTRAS ?= test

.PHONY: run test bench clean

$(BIN)/distgame: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

run: $(BIN)/distgame
	$(BIN)/distgame run --config $(CONFIG)

test: $(BIN)/distgame
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n 2 --dist loadfile tests

bench: $(BIN)/distgame
	$(BIN)/distgame bench --config $(CONFIG)

clean:
	rm -rf runs
