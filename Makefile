# Two commands on a fresh machine:
#   make demo   - set up .venv (torch 2.13.0 CPU), build the extension, run the default training job
#   make test   - set up .venv the same way and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP_ARGS ?=
STAMP   = $(VENV)/.glrec-installed

.PHONY: demo test bench env clean

# Every source the extension is built from (C++, CUDA, headers) and the Triton kernels. A CUDA
# torch brings the Triton it was built with; a CPU torch gets requirements-cpu.txt's, for the
# Triton interpreter (TRITON_INTERPRET=1 runs the kernel tests on the CPU).
SOURCES = $(shell find csrc kernels -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' \))

$(STAMP): requirements.txt requirements-cpu.txt setup.py pyproject.toml $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_ARGS) -r requirements.txt
	if $(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then \
		$(PY) -m pip install -q $(PIP_ARGS) -r requirements-cpu.txt; fi
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

env: $(STAMP)
	$(PY) -m glrec_fast.env_report

demo: $(STAMP)
	$(PY) -m glrec_fast.env_report
	$(PY) -m glrec_fast.train --out runs/demo

test: $(STAMP)
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider .

bench: $(STAMP)
	$(PY) -m pytest bench/ --benchmark-only -q

clean:
	rm -rf build $(VENV) glrec_fast/_C*.so *.egg-info
