# flashavatar: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv, install torch and the package (built against that torch, --no-build-isolation) and run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1

# CUDA_HOME (the toolkit root) is found by setup.py from nvcc itself when it is not set.
# Without a GPU torch would compile for every architecture: default to Hopper (sm_90) there.
ifeq ($(shell nvidia-smi -L 2>/dev/null),)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup build test test-gpu demo bench clean

setup: $(VENV)/.deps

# The CUDA build of torch takes about 5.5 GB in the venv; the extension's build about 0.3 GB more.
NEED_FREE_GB ?= 7

$(VENV)/.deps: pyproject.toml
	@free_kb=$$(df -Pk $(dir $(VENV)) | awk 'NR == 2 {print $$4}'); \
	if [ "$$free_kb" -lt $$(( $(NEED_FREE_GB) * 1024 * 1024 )) ]; then \
	  echo "setup: $$(( free_kb / 1024 / 1024 )) GB free on the disk of $(abspath $(dir $(VENV))); the venv (torch's CUDA build)" \
	       "and the build need about $(NEED_FREE_GB) GB. Free some space (or set NEED_FREE_GB) and run again." >&2; \
	  df -h $(dir $(VENV)) >&2; exit 1; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q --no-cache-dir "$(TORCH_SPEC)"  # no second copy of a multi-GB wheel in pip's cache
	$(PIP) install -q numpy scipy pyyaml tqdm "imageio>=2.30" imageio-ffmpeg pillow plyfile \
	    pytest pytest-benchmark pot
	touch $@

# Editable install (entry point `flashavatar`) + in-place build of flashavatar._C; rebuilt when csrc/ changes.
build: $(VENV)/.built

$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	FLASHAVATAR_SKIP_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m flashavatar.cli demo

bench: build
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build flashavatar/_C*.so *.egg-info $(VENV)/.built $(VENV)/.installed
