# Two commands do all the set-up on a fresh machine:  `make quickstart`  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: install quickstart train test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

quickstart: install          ## the main job: the embedded-default sweep (offline MNIST-5k, CPU)
	$(BIN)/dpmix-ray sweep sweeps/quickstart.yaml

train: install               ## one run of the embedded default config
	$(BIN)/dpmix-ray train

test: install                ## the whole suite, slow end-to-end tests included (what CI runs)
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
