# Two commands on a fresh machine:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint bench clean gpu-check gpu-check-dry-run gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this is the CPU wheel on the build machines; a looser spec would pull CUDA.
	# constraints.txt pins every dependency to the tested versions (the docker images use it too).
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/loram run configs/demo.yaml
	$(BIN)/loram inspect file://./bucket/demo-llama > /dev/null

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The device check on a GPU machine (bench/gpu_check.sh; wheels from `make gpu-wheels`, built here).
gpu-check:
	bench/gpu_check.sh

gpu-check-dry-run:
	bench/gpu_check.sh --dry-run

gpu-wheels:
	bench/build_gpu_wheels.sh

clean:
	rm -rf .loram bucket
