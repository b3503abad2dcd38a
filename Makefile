# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchnorm explain --shape 1,2,3,3 --momentum 1
	$(VENV)/bin/batchnorm demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_bn.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
