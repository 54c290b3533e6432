# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast clean-venv

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python launch/demo.py --workdir=workdirs/demo

test: $(VENV)/.installed
	$(BIN)/python -m jaxstar.allocator $(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(VENV)/.installed  # everything but the long end-to-end runs
	$(BIN)/python -m jaxstar.allocator $(BIN)/python -m pytest -q --durations=15 -m 'not slow' tests

clean-venv:
	rm -rf $(VENV)
