# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each creates .venv if needed and installs what it needs; torch is installed first and pinned,
# so the later installs never pull a second torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench-cpu clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hai_medqa.demo --workdir outputs/demo

# HAI_TEST_FLEX_CPU=1: also prove packing exact under flex attention on the CPU (~1 min of compiling).
test: $(STAMP)
	HAI_TEST_FLEX_CPU=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
