# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python launch/demo.py --workdir=workdirs/demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
