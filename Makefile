# The commands the README names. `make setup run` on a fresh machine; `make test` for the tests.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export GX_ANALYTICS_ENABLED=False
export MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1

.PHONY: setup data run test bench ui repro clean

setup: $(BIN)/udaflow

$(BIN)/udaflow: pyproject.toml
	@# a new venv is ~6.7 GB (torch's CUDA build: nvidia 3.2 GB, triton 0.9 GB): say so before pip fills the disk
	@test -x $(BIN)/python || [ "$$(df -Pk . | awk 'NR==2{print $$4}')" -ge 7500000 ] || \
	  { echo "make setup: the venv needs about 7.5 GB free; $(CURDIR) has $$(df -Ph . | awk 'NR==2{print $$4}')" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

data: setup
	$(BIN)/udaflow data build

run: data
	$(BIN)/udaflow run --profile quick

# two pytest workers, a test file each at a time (its module fixtures and servers stay in one process):
# most of the suite waits on subprocesses, servers and locks, so two cores run it in 60-64% of
# the time of one worker (README); TEST_JOBS=1 runs it in this process alone. The 20 slowest tests are
# listed at the end: CI has 40 minutes, and that list says where they go
TEST_JOBS ?= 2
test: setup
	$(BIN)/python -m pytest -q --durations=20 $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

repro: setup  # dvc.yaml's stages call `udaflow`, so the venv goes first on PATH
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

ui: setup
	$(BIN)/udaflow ui

bench: data
	$(BIN)/udaflow bench --shifts synth:mnist,mnist:mnistm --methods source_only,oracle,dann,cdan,mcc,cdtrans,adamatch,ssrt --seeds 1 --profile quick --jobs 2 --out bench.json

clean:  # run outputs only: data/, the DVC cache and the MLflow store are kept
	rm -rf runs bench.json
