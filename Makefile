# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each creates .venv if needed and installs what it needs; torch is installed first and pinned,
# so the later installs never pull a second torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-engines gguf-demo install lint bench-cpu clean

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

# Cross-engine checks (issue 16): llama.cpp (built once from its sdist, ~10 min on 2 cores, then cached
# outside the clone), transformers 4.57.6 in its own folder, mistral.rs and Go read what the project publishes.
test-engines: $(STAMP)
	PY=$(PY) bash .ci/engines.sh
	HAI_ENGINE_TESTS=1 $(PY) -m pytest -q tests/engines

# GGUF (f16, q8_0) + Ollama Modelfile of the demo's merged tiny model, after `make demo`.
gguf-demo: $(STAMP)
	$(PY) -m hai_medqa.publish.gguf_release outputs/demo/merged --repo-id your-hf-id/EXAONE-3.5-MedQA-demo --types f16,q8_0

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
