# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-fast test-numerics bench clean

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned resolution pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements-ci.txt -e ".[all,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/editr2 demo --out demo_out

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Everything but the tests marked `slow` (training runs, subprocesses, the shipped model's quality floors): for the
# edit-test loop. `make test` runs them all.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The float comparisons across code paths or memory layouts (marker `numerics`) once more under other CPU kernels:
# MKL restricted to SSE4.2 (its SSE4.2 matrix-vector kernel sums in another order for operands that are not 16-byte
# aligned, e.g. memory-mapped safetensors weights, as AVX-512 kernels do on some CPUs) and ATen's non-vectorised
# kernels. A test that assumes bit-equality where the memory layout or the instruction set differs fails here on any
# x86-64 machine, not only on the CPUs where the default kernels differ. (Not MKL_CBWR: its reproducibility modes make
# results independent of alignment, so an unaligned weight would go unnoticed; measured with torch 2.13.0.)
NUMERICS_ENV = MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default

test-numerics: $(STAMP)
	$(NUMERICS_ENV) $(PY) -c "import torch; assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'"
	HF_HUB_OFFLINE=1 $(NUMERICS_ENV) $(PY) -m pytest -q -m numerics

clean:
	rm -rf $(VENV) demo_out .pytest_cache
