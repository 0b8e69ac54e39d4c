# Two commands do all the set-up on a fresh machine:  `make quickstart`  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: install quickstart train test test-fast bench clean gpu-wheels

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

# bench/gpu_check.sh's wheels for a GPU machine with Python 3.12 + torch and no registry: cp312 manylinux x86_64,
# no dependencies resolved (the lists are closed), into .gpu-wheels/base (< 60 MiB, so it travels with the
# source in one 64 MiB carry) and .gpu-wheels/scipy (a second carry; only the train stage needs it).
PIP ?= $(if $(wildcard $(BIN)/pip),$(BIN)/pip,python3 -m pip)
GPU_WHEEL_FLAGS = --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
gpu-wheels:
	rm -rf .gpu-wheels
	$(PIP) download $(GPU_WHEEL_FLAGS) -d .gpu-wheels/base -r bench/gpu-wheels.txt
	$(PIP) download $(GPU_WHEEL_FLAGS) -d .gpu-wheels/scipy -r bench/gpu-wheels-scipy.txt
	@du -sh .gpu-wheels/base .gpu-wheels/scipy
	@test $$(du -sm .gpu-wheels/base | cut -f1) -lt 60 || { echo "gpu-wheels: .gpu-wheels/base is over 60 MiB" >&2; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache .gpu-wheels .gpu-site
