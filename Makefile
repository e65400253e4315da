# counterwarp: two commands set everything up on a fresh machine.
#   make demo   -> create .venv if needed, install, run the demo on embedded synthetic data
#   make test   -> same set-up, run the test suite
#   make bench  -> same set-up, run the speed benchmarks
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=

.PHONY: demo test bench lint install clean real-brain

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/counterwarp demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: install
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

bench: install
	$(PY) benchmarks/run.py

# Debian's mricron-data: the Colin27 brain (ch2.nii.gz with skull, ch2bet.nii.gz stripped)
# and the AAL / Harvard-Oxford atlases, for `synth --anatomy colin27` and the real-brain tests.
real-brain:
	@test -f /usr/share/mricron/templates/ch2bet.nii.gz || \
	  (apt-get update -qq && apt-get install -y -qq mricron-data)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build dist *.egg-info src/*.egg-info
