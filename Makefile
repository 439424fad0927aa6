# fedge: the two quick-start commands are `make demo` and `make test`.
# Both create .venv on first use and install what they need into it.
#
#   make demo                 one command: broker + aggregator + 10 agents
#   make test                 lint + the whole test suite (needs mosquitto, nats-server)
#   make docs                 the documentation site in site/ (mkdocs build --strict)
#   make test-no-vnni         the export tests on an emulated x86 CPU without VNNI
#   make bench                the benchmarks in bench/ (JSON under bench/results)
#   make bench-noniid         FedAvg on MNIST's pathological non-IID split (long)
#
# fedge ships no MNIST: keras' mnist.npz is read from $FEDGE_DATA when it is set
# (in the environment or on the command line: make passes it on to the tests and
# the benchmarks), else from the user cache (~/.cache/fedge), where
# `fedge data fetch mnist` puts it. Tests that need MNIST read $FEDGE_DATA only
# and skip without it:  make test FEDGE_DATA=/path/to/dir
#
# PyTorch is pinned through TORCH_SPEC; on a machine without a GPU, point
# TORCH_INDEX at the CPU wheels to skip gigabytes of CUDA libraries:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedge-installed
# Where the benchmarks find mnist.npz: as fedge.datasets looks for it.
MNIST_DIR := $(or $(FEDGE_DATA),$(if $(filter /%,$(XDG_CACHE_HOME)),$(XDG_CACHE_HOME),$(HOME)/.cache)/fedge)

.PHONY: install demo docs test lint unit integration test-no-vnni test-arm64 test-systemd test-pyversions test-py310 test-py313 bench bench-noniid need-mnist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedge demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy fedge fedge_cli aggregator edge_agent export

# The documentation site in site/ (the reference pages are generated from the code).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# FEDGE_DATA, when set, reaches the tests through the environment.
test: lint
	$(BIN)/python -m pytest -q --durations=30

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration tests/e2e

# The agent on arm64: a Debian bookworm arm64 root (cached in ~/.cache/fedge-arm64)
# under qemu-user, install.sh inside as a Pi owner runs it, rounds against this
# host's aggregator. Root, debootstrap, qemu-user-static; slow (tens of minutes).
test-arm64: $(STAMP)
	FEDGE_ARM64=1 $(BIN)/python -m pytest -v -x tests/arm64

# The service units under a real systemd (root; systemd-nspawn boots a Debian root).
test-systemd: $(STAMP)
	FEDGE_SYSTEMD=1 $(BIN)/python -m pytest -v -x tests/systemd

# The suite on the other Pythons fedge supports, each in its distribution's amd64
# root (cached in ~/.cache/fedge-pyversions), lint and pytest inside under chroot:
# 3.10 in Ubuntu jammy (a Jetson's JetPack 6), 3.13 in Debian trixie (Raspberry
# Pi OS's). Root, debootstrap; a few minutes and 7 GB to build a root the first
# time, about 15 to run the suite in it. PYVERSION=3.10|3.13|all (default all).
# MNIST from $(FEDGE_DATA) when set.
PYVERSION ?= all
test-pyversions: $(STAMP)
	FEDGE_PYVERSIONS=1 FEDGE_PYVERSION=$(PYVERSION) $(BIN)/python -m pytest -v -s -x tests/pyversions

test-py310 test-py313: $(STAMP)
	FEDGE_PYVERSIONS=1 FEDGE_PYVERSION=$(patsubst test-py3%,3.%,$@) $(BIN)/python -m pytest -v -s -x tests/pyversions

# The export suite on an emulated AMD EPYC without VNNI (qemu-x86_64; slow: ~4 min).
test-no-vnni: $(STAMP)
	$(BIN)/python tests/export/emulated_cpu.py suite

# The MNIST the benchmarks read: $(MNIST_DIR)/mnist.npz, passed on to them as FEDGE_DATA.
need-mnist bench bench-noniid: export FEDGE_DATA := $(MNIST_DIR)
need-mnist:
	@test -f "$(MNIST_DIR)/mnist.npz" || { echo "make: the benchmarks need MNIST, not found in $(MNIST_DIR): \
	run $(BIN)/fedge data fetch mnist, or set FEDGE_DATA to the directory that holds mnist.npz" >&2; exit 2; }

bench: need-mnist $(STAMP)
	mkdir -p bench/results
	$(BIN)/python bench/round_latency.py --out bench/results/round_latency.json
	$(BIN)/python bench/aggregate.py --out bench/results/aggregate.json
	$(BIN)/python bench/export.py --out bench/results/export.json
	$(BIN)/python bench/fedavg_mnist.py --data "$(MNIST_DIR)/mnist.npz" --out bench/results/fedavg_mnist_iid.json
	$(BIN)/python bench/poisoning.py --out bench/results/poisoning.json
	$(BIN)/python bench/privacy.py --out bench/results/privacy.json
	$(BIN)/python bench/secagg.py --out bench/results/secagg_protocol.json
	$(BIN)/python bench/secagg.py --mode rounds --rounds 5 --out bench/results/secagg_rounds.json
	$(BIN)/python bench/secagg.py --mode accuracy --out bench/results/secagg_accuracy.json

# The pathological non-IID split of the FedAvg paper: 800 rounds per codec, long.
bench-noniid: need-mnist $(STAMP)
	mkdir -p bench/results
	$(BIN)/python bench/fedavg_mnist.py --data "$(MNIST_DIR)/mnist.npz" --split shards --codec none --codec default \
		--out bench/results/fedavg_mnist_shards.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build site *.egg-info
