# The README's two commands: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REDIS_URL ?= redis://127.0.0.1:6379/0
export REDIS_URL

.PHONY: install test lint run redis stack clean

# The stamp is rebuilt when pyproject.toml changes, so a new dependency is installed.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Makes sure a Redis answers at REDIS_URL, starting one on loopback if needed.
redis: install
	$(BIN)/python scripts/ensure_redis.py "$(REDIS_URL)"

lint: install
	$(BIN)/ruff check ponos_tasks tests scripts benchmarks celeryconfig.py

test: install redis lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Runs the agent against the embedded local stack (or PONOS_CONFIG for a real deployment).
run: install redis
	$(BIN)/ponos-vast run

stack: install redis
	$(BIN)/ponos-vast stack

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
