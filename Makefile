# The README's two commands: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REDIS_URL ?= redis://127.0.0.1:6379/0
export REDIS_URL

.PHONY: install test lint run redis stack tools bench clean

# The stamp is rebuilt when pyproject.toml changes, so a new dependency is installed.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[sim,test]'
	touch $@

install: $(VENV)/.installed

# Side virtual environments for the compatibility tests (their pins clash with ours): the
# official vastai CLI and arkindex-base-worker. Installed here, not by the tests, so that
# tests only ever talk to 127.0.0.1; a failed install is a warning and those tests skip.
TOOL_VENVS := .venvs/vastai/.ponos-installed .venvs/base-worker/.ponos-installed .venvs/promtool/.ponos-installed
.venvs/vastai/.ponos-installed:
	@$(PYTHON) -m venv --clear .venvs/vastai && .venvs/vastai/bin/pip install --quiet 'vastai>=1.9,<1.10' \
		&& touch $@ || echo "warning: could not install vastai in .venvs/vastai; its tests will skip"
.venvs/base-worker/.ponos-installed:
	@$(PYTHON) -m venv --clear .venvs/base-worker && .venvs/base-worker/bin/pip install --quiet 'arkindex-base-worker>=0.6,<0.7' \
		&& touch $@ || echo "warning: could not install arkindex-base-worker in .venvs/base-worker; its test will skip"
# promtool (checks and unit-tests deploy/prometheus/alerts.yml): taken out of Debian's
# `prometheus` package with apt-get download + dpkg-deb, so that nothing is installed system-wide
# and no Prometheus server starts; elsewhere its tests skip.
.venvs/promtool/.ponos-installed:
	@rm -rf .venvs/promtool && mkdir -p .venvs/promtool/bin && cd .venvs/promtool \
		&& apt-get download prometheus >/dev/null 2>&1 && dpkg-deb -x prometheus_*.deb deb \
		&& mv deb/usr/bin/promtool bin/ && rm -rf deb prometheus_*.deb \
		&& bin/promtool --version >/dev/null && touch .ponos-installed \
		|| echo "warning: could not get promtool (Debian's prometheus package) into .venvs/promtool; its tests will skip"
tools: $(TOOL_VENVS)

# Makes sure a Redis answers at REDIS_URL, starting one on loopback if needed.
redis: install
	$(BIN)/python scripts/ensure_redis.py "$(REDIS_URL)"

LINTED := ponos_tasks tests scripts benchmarks celeryconfig.py
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

test: install redis lint tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pure tests only (no Redis, simulators, sockets or processes; tests/conftest.py marks the
# others `stack`): a few seconds.
.PHONY: test-fast
test-fast: install
	$(BIN)/python -m pytest -m "not stack" $(PYTEST_ARGS)

# Regenerates constraints.txt (the worker image's pinned versions) from a clean venv; run it
# after changing [project] dependencies, with the image's Python (3.11).
.PHONY: lock
lock:
	$(PYTHON) scripts/lock_constraints.py

# Runs the agent against the embedded local stack (or PONOS_CONFIG for a real deployment).
run: install redis
	$(BIN)/ponos-vast run

stack: install redis
	$(BIN)/ponos-vast stack

# Benchmarks (about 30 minutes; not part of `make test`): results go to BENCHMARKS.md.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.sync_loop
	$(BIN)/python -m benchmarks.cost
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.launch
	$(BIN)/python -m benchmarks.fleet

# The chaos suite (about 40 minutes): three seeds of 60 tasks and one run of 200, each with a
# fault-free run of the same workload for the bill; writes RELIABILITY.md. The quick variant
# (12 tasks) is part of `make test`.
.PHONY: chaos
chaos: install
	$(BIN)/python -m benchmarks.chaos --seeds 1,2,3 --tasks 60 --big 200 --write

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
