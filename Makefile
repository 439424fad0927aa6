# fedge: the two quick-start commands are `make demo` and `make test`.
# Both create .venv on first use and install what they need into it.
#
#   make demo                 one command: broker + aggregator + 10 agents
#   make test                 lint + the whole test suite (needs mosquitto)
#   make test-no-vnni         the export tests on an emulated x86 CPU without VNNI
#   make bench                the benchmarks in bench/ (JSON under bench/results)
#   make bench-noniid         FedAvg on MNIST's pathological non-IID split (long)
#
# fedge ships no MNIST: the benchmarks (and the arm64 and systemd suites) read
# $(FEDGE_DATA)/mnist.npz, keras' mnist.npz:  make bench FEDGE_DATA=/path/to/dir
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

.PHONY: install demo test lint unit integration test-no-vnni test-arm64 test-systemd bench bench-noniid need-mnist clean

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

test: lint
	$(BIN)/python -m pytest -q

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

# The export suite on an emulated AMD EPYC without VNNI (qemu-x86_64; slow: ~4 min).
test-no-vnni: $(STAMP)
	$(BIN)/python tests/export/emulated_cpu.py suite

# The MNIST the benchmarks read (FEDGE_DATA comes from the environment or
# the command line, and make passes it on to them).
need-mnist:
	@test -n "$(FEDGE_DATA)" && test -f "$(FEDGE_DATA)/mnist.npz" || { echo "make: the benchmarks need \
	MNIST: set FEDGE_DATA to the directory that holds mnist.npz (make bench FEDGE_DATA=/path/to/dir)" >&2; exit 2; }

bench: need-mnist $(STAMP)
	mkdir -p bench/results
	$(BIN)/python bench/round_latency.py --out bench/results/round_latency.json
	$(BIN)/python bench/aggregate.py --out bench/results/aggregate.json
	$(BIN)/python bench/export.py --out bench/results/export.json
	$(BIN)/python bench/fedavg_mnist.py --data "$(FEDGE_DATA)/mnist.npz" --out bench/results/fedavg_mnist_iid.json
	$(BIN)/python bench/poisoning.py --out bench/results/poisoning.json
	$(BIN)/python bench/privacy.py --out bench/results/privacy.json
	$(BIN)/python bench/secagg.py --out bench/results/secagg_protocol.json
	$(BIN)/python bench/secagg.py --mode rounds --rounds 5 --out bench/results/secagg_rounds.json
	$(BIN)/python bench/secagg.py --mode accuracy --out bench/results/secagg_accuracy.json

# The pathological non-IID split of the FedAvg paper: 800 rounds per codec, long.
bench-noniid: need-mnist $(STAMP)
	mkdir -p bench/results
	$(BIN)/python bench/fedavg_mnist.py --data "$(FEDGE_DATA)/mnist.npz" --split shards --codec none --codec default \
		--out bench/results/fedavg_mnist_shards.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
