# Two commands on a fresh machine:
#   make demo   - set up .venv (torch 2.13.0 CPU), build the extension, run the default training job
#   make test   - set up .venv the same way and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP_ARGS ?=
STAMP   = $(VENV)/.glrec-installed

.PHONY: demo test bench env clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*/*.cpp csrc/*/*/*.cpp csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_ARGS) -r requirements.txt
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
