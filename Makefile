# The README's commands. `make demo` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench bench-quick gpu-check clean

# The package is installed the way a user installs it (a plain pip install); pip builds the optional
# CUDA library (csrc/) when nvcc is found, and a change there rebuilds it. The native op
# (rcka_kernels/csrc/) is compiled against the torch installed here at its first use, and again
# whenever its source changes (rcka_kernels/_native.py); CI's RCKA_REQUIRE_NATIVE=1 makes the
# tests fail where it cannot be built.
$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q triton || echo "triton could not be installed: the triton backend will be unavailable"
	$(PY) -m pip install -q -e ".[test,distill,bench]"
	touch $(STAMP)

setup: $(STAMP)

# naive CKA losses vs rcka-kernels (values, time, memory), then a short distillation on digits,
# ending with the teacher-vs-student layer CKA of its CE, KD and RCKA students (one figure, one table)
demo: $(STAMP)
	$(PY) examples/demo.py
	@echo "make demo: deleting runs/demo (an earlier demo's output) and writing it afresh"
	rm -rf runs/demo
	$(PY) -m rcka_kernels.distill --epochs 8 --teacher-epochs 10 --seeds 3 --no-progress --out runs/demo
	$(PY) -m rcka_kernels.compare --run runs/demo --no-progress

# lint first (ruff, configured in pyproject.toml), then the tests
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# peer libraries for the side-by-side benchmarks, without their dependencies so torch stays as installed
PEERS := $(VENV)/.peers
$(PEERS): $(STAMP)
	$(PY) -m pip install -q --no-deps torch-cka==0.21 ckatorch==1.0.3 cka-pytorch==1.1.3 geomloss==0.3.1 || echo "peer libraries unavailable: their benchmark rows record the import error"
	$(PY) -m pip install -q --no-deps pytorch-cka==1.1.3 torchmetrics==1.9.0 lightning-utilities==0.15.3 pyyaml safetensors || echo "pytorch-cka (or a dependency) unavailable: bench_compare records the import error"
	$(PY) -m pip install -q --no-deps seaborn==0.13.2 pandas==3.1.1 pytz tzdata lightning==2.6.6 || echo "ckatorch's or cka-pytorch's dependencies unavailable: bench_compare records the import error"
	touch $(PEERS)

bench: $(PEERS)
	$(PY) -m benchmarks.run_all

bench-quick: $(PEERS)
	$(PY) -m benchmarks.run_all --quick

# on a machine with an NVIDIA GPU: build (CUDA forced), the GPU tests, quick benchmarks and memcheck, into OUT
# (stages: GPU_CHECK="--stage test|bench|all|rerun"; `--dry-run` prints the plan anywhere)
GPU_CHECK ?= --stage all
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK) $(if $(OUT),--out $(OUT))

clean:
	rm -rf $(VENV) build *.egg-info runs
